// SuPreM revision: an OHIF mode for revising pre-annotated organs, served by the app after MONAI Label's own
// app-config.js (lib/ohif/__init__.py). MONAI Label 0.8.5's "monai-label" mode shows its panel but no brush
// tools and no segmentation panel (its toolbar never adds the segmentation buttons), so an annotator can run a
// model there but cannot fix or export the label. This mode is OHIF's own "segmentation" mode (brush, eraser,
// shapes, the segmentation panel with "Export DICOM SEG") with MONAI Label's panel on the left and MONAI
// Label's MPR layout: Next Sample, Run, fix, export, on one screen.
(function () {
  const MONAI_LABEL_PANEL = '@ohif/extension-monai-label.panelModule.monailabel';
  const extensionDependencies = {
    '@ohif/extension-default': '^3.0.0',
    '@ohif/extension-cornerstone': '^3.0.0',
    '@ohif/extension-cornerstone-dicom-seg': '^3.0.0',
    '@ohif/extension-monai-label': '^3.0.0',
  };

  // OHIF's segmentation panel exports with commandsManager.run('storeSegmentation', {segmentationId}): no
  // context, so in this OHIF build it reaches the SEG extension's command (the last context that has one),
  // which needs a data source it is not given, and the export fails ("Cannot read properties of undefined
  // (reading 'store')"). Given the active data source, that command asks for the series name and stores the
  // SEG (STOW-RS through the server's /proxy/dicom); the segmentation stays on screen for further fixes.
  function exportToTheDataSource({ servicesManager, extensionManager, commandsManager }) {
    const command = commandsManager.getCommand('storeSegmentation', 'SEGMENTATION');
    if (!command || command.commandFn.withDataSource) {
      return;
    }
    const store = command.commandFn;
    const { uiNotificationService } = servicesManager.services;
    const storeWithDataSource = async props => {
      if (props.dataSource) {
        return store(props);
      }
      try {
        const stored = await store({ ...props, dataSource: extensionManager.getActiveDataSource()[0] });
        if (stored) {
          const message = `Saved to the PACS as "${stored.SeriesDescription}"`;
          uiNotificationService.show({ title: 'Export DICOM SEG', message, type: 'success' });
        }
        return stored;
      } catch (error) {
        const message = `Not saved: ${(error && error.message) || error}`;
        uiNotificationService.show({ title: 'Export DICOM SEG', message, type: 'error' });
        throw error;
      }
    };
    storeWithDataSource.withDataSource = true;
    command.commandFn = storeWithDataSource;
  }

  // OHIF's Next Sample dialog shows the study and series only; the organs handed out are in this server's
  // /info/ (suprem.handouts). OK in that dialog reloads OHIF on the study, entering this mode: it then says
  // which organs of the study's series are handed out to OHIF's panel (which sends no client id).
  async function announceHandouts({ servicesManager, extensionManager }) {
    const studies = (new URLSearchParams(window.location.search).get('StudyInstanceUIDs') || '').split(',');
    const { uiNotificationService } = servicesManager.services;
    try {
      const { qidoRoot } = extensionManager.getActiveDataSource()[0].getConfig();
      const asJson = response => (response.ok ? response.json() : []);
      const series = await Promise.all(
        studies.filter(Boolean).map(study =>
          fetch(`${qidoRoot}/studies/${study}/series`, { headers: { Accept: 'application/dicom+json' } }).then(asJson)
        )
      );
      const uids = new Set(series.flat().map(s => s['0020000E'] && s['0020000E'].Value[0]));
      const info = await fetch(new URL('../info/', window.location.href)).then(asJson);
      const handouts = ((info.suprem || {}).handouts || []).filter(h => uids.has(h.image) && h.client === 'anonymous');
      for (const h of handouts) {
        const organs = h.organs === 'whole' ? 'the whole image' : h.organs.join(', ');
        // The notice stays on screen, so it says when the hold ends rather than how long it has left.
        const ends = new Date(Date.now() + h.hold_left_s * 1000);
        const until = ends.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
        const message = `${organs} (held until ${until})`;
        // On screen while the hold lasts (OHIF's toasts go after seconds): the organs are the revision's work.
        // (At most a day: a browser's timer overflows past 24.8 days and would close it at once.)
        const duration = Math.min(Math.max(20, h.hold_left_s), 86400) * 1000;
        uiNotificationService.show({ title: 'SuPreM: organs to revise', message, type: 'info', duration });
      }
    } catch (error) {
      console.warn('SuPreM: the hand-outs of this study could not be read', error);
    }
  }

  async function modeFactory({ modeConfiguration, loadModules }) {
    const [segmentationMode] = await loadModules(['@ohif/mode-segmentation']);
    const base = await segmentationMode.modeFactory({ modeConfiguration, loadModules });
    const [route] = base.routes;
    return {
      ...base,
      id: 'suprem-revision',
      routeName: 'suprem',
      displayName: 'SuPreM revision',
      hangingProtocol: 'mpr', // axial, sagittal and coronal, as MONAI Label's mode shows a CT
      extensions: extensionDependencies,
      onModeEnter: args => {
        base.onModeEnter(args);
        exportToTheDataSource(args);
        announceHandouts(args);
      },
      routes: [
        {
          ...route,
          path: 'suprem',
          layoutTemplate: args => {
            // MONAI Label's panel on the left, first (the series list behind its tab), OHIF's segmentation
            // panel on the right: both stay on screen, so the panel keeps its connection while the
            // annotator paints (a side panel's hidden tab is unmounted: MONAI Label's would disconnect).
            const layout = route.layoutTemplate(args);
            const leftPanels = [MONAI_LABEL_PANEL, ...layout.props.leftPanels];
            const props = { ...layout.props, leftPanels, leftPanelDefaultClosed: false, rightPanelDefaultClosed: false };
            return { ...layout, props };
          },
        },
      ],
    };
  }

  window.config.modes = window.config.modes || [];
  window.config.modes.push({ id: 'suprem-revision', modeFactory, extensionDependencies });
})();

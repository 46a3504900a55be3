"""The OHIF viewer that MONAI Label serves at /ohif/, opened in headless Chromium on a study in Orthanc.

A real Orthanc (DICOMweb plugin) holds the shared CT series; a real ``monailabel start_server`` runs on
it, and OHIF reaches Orthanc through the server's /proxy/dicom (its bundled app-config.js). Chromium is
driven over the DevTools protocol (tests/ohif_support.py). The study list must show the study and link
the viewer to it; the viewer (/ohif/viewer?StudyInstanceUIDs=...) must draw the series' own pixels where
its world-to-canvas mapping puts them; and a label saved through MONAI Label must come back from Orthanc
as a DICOM SEG that OHIF lists under the app's segment names and tints onto the SEG's pixels of the
shown slice. Screenshots stay in the test's temporary folder and are named in failure messages.

The server hands out organs (``organs_per_sample 2``), and the last test drives an OHIF annotator's round
of organ-level revision with the buttons of the app's OHIF mode (/ohif/suprem: MONAI Label's panel, OHIF's
brush and its segmentation panel's SEG export). MONAI Label's panel (as MONAI Label 0.8.5 bundles it) asks
``random`` whatever its Strategy list shows, so the server runs as an OHIF site must: ``random_strategy
importance``. Orthanc holds two studies of the series (the second for Next Sample)."""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request
from typing import Dict, List

import nibabel as nib
import numpy as np
import pytest

from dicomweb_support import dicomweb_server, loaded_orthanc, orthanc_missing, trainer_view
from lib.classes import CLASS_INDEX, LABEL_SETS, TOTALSEG_TO_SUPREM, mapping_lut
from lib.importance.records import INFO_KEY, is_scored
from lib.ohif import REVISION_ROUTE
from ohif_support import (
    Browser,
    chromium_missing,
    colored,
    crop,
    displayed_image,
    gray,
    page_affine,
    sample_on_page,
)
from support import shared_path

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or ""),
    pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or ""),
    pytest.mark.timeout(420),  # fixtures included: a stuck browser or server fails instead of hanging
]

ATLAS25 = {CLASS_INDEX[n]: n for n in LABEL_SETS["atlas25"]}
VIEWPORT = "[data-cy=viewport-pane]"
SEG_THUMBNAIL = "[data-cy=study-browser-thumbnail-no-image]"  # OHIF shows a DICOM SEG without a picture
BLACK = 30  # grey level (of 255) under which a screenshot pixel counts as background


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    import pydicom

    series_dir = shared_path("data", "totalseg-example", "dicom")
    # Two studies of the series: the app's saved label goes to the first; the second stays for Next Sample.
    with loaded_orthanc(str(tmp_path_factory.mktemp("orthanc")), series_dir, copies=2) as o:
        o.series_description = str(pydicom.dcmread(o.files[0], stop_before_pixels=True).SeriesDescription)
        yield o


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    with dicomweb_server(orthanc, work, organs_per_sample="2", random_strategy="importance") as srv:  # organ level
        yield srv


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """The folder that keeps the screenshots (named in failure messages)."""
    return tmp_path_factory.mktemp("ohif-screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, server, orthanc):
    b = Browser(str(tmp_path_factory.mktemp("chromium")))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def saved(server, orthanc, tmp_path_factory):
    """TotalSegmentator's label of the series, as the app's classes, saved through MONAI Label as the final
    label: MONAI Label writes it to Orthanc as a DICOM SEG. Returns the label's class ``values`` and the
    ``seg`` read back from Orthanc (pydicom)."""
    import pydicom
    from monailabel.client import MONAILabelClient
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    work = tmp_path_factory.mktemp("label")
    # The image as MONAI Label caches it (NIfTI from the series): a label must be on its grid.
    image_path = str(work / "image.nii.gz")
    with urllib.request.urlopen(f"{server.url}/datastore/image?image={orthanc.series_uid}", timeout=120) as r:
        with open(image_path, "wb") as f:
            f.write(r.read())
    image = nib.load(image_path)
    ref = nib.load(shared_path("data", "totalseg-example", "dicom-seg.nii.gz"))
    lut = np.array(mapping_lut(TOTALSEG_TO_SUPREM), np.uint8)
    mapped = lut[np.asarray(ref.dataobj).astype(np.int64)]
    arr = apply_orientation(mapped, ornt_transform(io_orientation(ref.affine), io_orientation(image.affine)))
    assert arr.shape == image.shape, (arr.shape, image.shape)
    label_path = str(work / "final.nii.gz")
    nib.save(nib.Nifti1Image(arr, image.affine), label_path)
    values = sorted(set(np.unique(arr).tolist()) - {0})
    assert len(values) >= 3, values  # a real multi-organ label

    client = MONAILabelClient(server.url, tmpdir=str(work))
    try:
        client.save_label(orthanc.series_uid, label_path, tag="final", params={})
    except Exception:
        print(server.log_tail(40))
        raise
    segs = orthanc.find_series(Modality="SEG")
    assert len(segs) == 1, f"expected one DICOM SEG in Orthanc after the save, found {segs}"
    instances = orthanc.series_instances(segs[0]["ID"])
    assert len(instances) == 1, instances
    seg = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instances[0]["ID"])))
    return {"values": values, "seg": seg}



def _instance(orthanc, sop_uid: str):
    """The uploaded file of the series with SOP Instance UID ``sop_uid`` (pydicom, with pixels)."""
    import pydicom

    path = os.path.join(os.path.dirname(orthanc.files[0]), f"{sop_uid}.dcm")  # prepare_series names them so
    assert path in orthanc.files, f"the viewer shows instance {sop_uid}, not one of the series"
    return pydicom.dcmread(path)


def _image_problem(browser: Browser, orthanc, path: str, rect) -> str | None:
    """What keeps the viewport in screenshot ``path`` from showing the series' slice (None: nothing).

    A bare CT slice: grey, many levels, a lit body on a dark background; and the slice the viewer says it
    shows: the screenshot's grey levels follow the file's pixels (in HU, clipped to the viewer's window),
    put where the viewer's own mapping draws them."""
    px = crop(path, rect)
    g = gray(px)
    levels = len(np.unique(g.astype(int)))
    if g.std() < 25 or levels < 64:
        return f"the viewport is not an image yet (grey-level std {g.std():.1f}, {levels} distinct levels)"
    lit = float((g > BLACK).mean())
    if not 0.05 < lit < 0.9:
        return f"{lit:.1%} of the viewport is lit, not a body on a dark background"
    tint = float(colored(px).mean())
    if tint > 0.005:
        return f"{tint:.2%} of the viewport is coloured: not a bare CT slice"
    shown = displayed_image(browser)
    ds = _instance(orthanc, shown["sop_uid"])
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if shown["voi"]:
        hu = np.clip(hu, *shown["voi"])
    want, inside = sample_on_page(hu, page_affine(browser, ds), rect)
    if want.shape != g.shape or inside.mean() < 0.3:
        return f"the image covers {inside.mean():.0%} of the viewport {rect}"
    r = float(np.corrcoef(g[inside], want[inside])[0, 1])
    if r < 0.9:
        return f"the viewport's grey levels follow instance {shown['sop_uid']}'s pixels only with r = {r:.2f}"
    return None


def _dismiss_banner(browser: Browser):
    """OHIF's 'investigational use' banner covers the bottom of the viewport until it is confirmed."""
    if browser.rect("[data-cy=confirm-and-hide-button]"):
        browser.click("[data-cy=confirm-and-hide-button]")
        browser.wait_for("!document.querySelector('[data-cy=confirm-and-hide-button]')", "the banner gone", 30)


def _open_viewer(browser: Browser, server, orthanc):
    """The basic viewer on the study, showing the image series (its overlay names it, slice 1 of all)."""
    browser.navigate(f"{server.url}/ohif/viewer?StudyInstanceUIDs={orthanc.study_uid}")
    want = f"(1/{len(orthanc.files)})"
    browser.wait_for(
        "(() => { const t = document.querySelector('[data-cy=viewport-overlay-top-left]');"
        " const b = document.querySelector('[data-cy=viewport-overlay-bottom-right]');"
        f" return !!t && !!b && t.innerText.includes({json.dumps(orthanc.series_description)})"
        f" && b.innerText.includes({json.dumps(want)}); }})()",
        f"the viewport overlay naming series {orthanc.series_description!r} at slice {want}",
    )
    _dismiss_banner(browser)


def test_ohif_study_list_shows_the_orthanc_study_and_links_the_viewer_to_it(browser, server, orthanc, shots):
    browser.navigate(server.url + "/ohif/")
    row = f'[data-cy="studyRow-{orthanc.study_uid}"]'
    shot = str(shots / "study-list.png")
    try:
        text = browser.wait_for(
            f"document.querySelector({json.dumps(row)})?.innerText", "the study's row in OHIF's study list"
        )
    finally:
        browser.screenshot(shot)
    cells = [c.strip() for c in text.split("\n") if c.strip()]
    assert "CT" in cells and str(len(orthanc.files)) in cells, f"{cells} (screenshot: {shot})"

    # Opening the row lists the study's series, read from Orthanc, and links each viewer mode to the study.
    browser.click(f'[data-cy="{orthanc.study_uid}"]')
    try:
        browser.wait_for(
            f"document.querySelector({json.dumps(row)}).innerText.includes({json.dumps(orthanc.series_description)})",
            f"series {orthanc.series_description!r} in the opened study row",
        )
    finally:
        browser.screenshot(shot)
    links = browser.evaluate(f"Array.from(document.querySelectorAll({json.dumps(row + ' a')})).map(a => a.href)")
    for route in ("viewer", REVISION_ROUTE):  # OHIF's basic viewer and the app's revision mode
        mode = f"{server.url}/ohif/{route}?StudyInstanceUIDs={orthanc.study_uid}"
        assert mode in links, f"no link to {mode} in the study row: {links} (screenshot: {shot})"


def test_ohif_viewer_renders_the_series_pixels_from_orthanc(browser, server, orthanc, shots):
    _open_viewer(browser, server, orthanc)
    thumbs = browser.evaluate("document.querySelectorAll('[data-cy=study-browser-thumbnail]').length")
    assert thumbs == 1, f"{thumbs} image series in the study browser"
    rect = browser.rect(VIEWPORT)
    browser.wait_for_screenshot(
        str(shots / "viewer-image.png"),
        lambda p: _image_problem(browser, orthanc, p, rect),
        "the viewport should show the CT slice",
    )


def test_ohif_viewer_draws_and_lists_the_dicom_seg_saved_by_the_app(browser, server, orthanc, saved, shots):
    _open_viewer(browser, server, orthanc)
    seg_text = browser.wait_for(
        f"document.querySelector({json.dumps(SEG_THUMBNAIL)})?.innerText", "the DICOM SEG in the study browser"
    )
    assert "SEG" in seg_text.split(), seg_text
    rect = browser.rect(VIEWPORT)
    browser.wait_for_screenshot(
        str(shots / "viewer-before-seg.png"),
        lambda p: _image_problem(browser, orthanc, p, rect),
        "the CT slice before the SEG is opened",
    )

    # A double click puts the SEG in the viewport; OHIF then asks whether to load it onto its image.
    browser.click(SEG_THUMBNAIL, clicks=2)
    browser.wait_for("!!document.querySelector('[data-cy=yes-hydrate-btn]')", "OHIF's offer to open the SEG")
    browser.click("[data-cy=yes-hydrate-btn]")
    browser.wait_for("!document.querySelector('[data-cy=yes-hydrate-btn]')", "the SEG opened")

    seg = saved["seg"]
    frames = seg.pixel_array.reshape((-1, int(seg.Rows), int(seg.Columns))).astype(bool)

    def overlay_problem(path: str) -> str | None:
        shown = displayed_image(browser)
        ds = _instance(orthanc, shown["sop_uid"])
        # The SEG's frames on the shown slice: what the viewer should tint there.
        mask = np.zeros(frames.shape[1:], bool)
        for frame, fg in zip(frames, seg.PerFrameFunctionalGroupsSequence):
            pos = [float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient]
            if np.allclose(pos, [float(x) for x in ds.ImagePositionPatient], atol=1e-2):
                mask |= frame
        assert mask.sum() > 1000, f"the SEG has {mask.sum()} pixels on the shown slice: nothing to see ({path})"
        tint = colored(crop(path, rect))
        if tint.mean() < 0.01:
            return f"only {tint.mean():.2%} of the viewport is coloured: no segmentation drawn"
        want, _ = sample_on_page(mask, page_affine(browser, ds), rect)
        iou = float((tint & want).sum() / (tint | want).sum())
        if iou < 0.7:
            return f"the coloured pixels overlap the SEG's pixels on the slice with IoU {iou:.2f} only"
        return None

    overlay = str(shots / "viewer-seg-overlay.png")
    browser.wait_for_screenshot(overlay, overlay_problem, "the SEG should be drawn over the CT slice")
    g = gray(crop(overlay, rect))  # the image is still there under the overlay
    assert g.std() > 25 and len(np.unique(g.astype(int))) >= 64, f"no CT image under the overlay: {overlay}"

    # The segmentation panel lists the SEG's segments under the app's names, in label-value order.
    if not browser.evaluate("!!document.querySelector('[data-cy=data-row]')"):
        browser.click("[data-cy=panelSegmentation-btn]")
    want = [ATLAS25[v] for v in saved["values"]]
    panel = str(shots / "viewer-seg-panel.png")
    try:
        rows = browser.wait_for(
            "(() => { const r = Array.from(document.querySelectorAll('[data-cy=data-row]'))"
            f".map(e => e.innerText.trim().split('\\n').pop().trim()); return r.length >= {len(want)} && r; }})()",
            "the segments in OHIF's segmentation panel",
        )
    finally:
        browser.screenshot(panel)
    assert rows == want, f"OHIF lists {rows}, the saved label has {want} (screenshot: {panel})"
    tint = colored(crop(panel, browser.rect(VIEWPORT))).mean()
    assert tint >= 0.01, f"the overlay is gone with the panel open ({tint:.2%} coloured): {panel}"


# --- organ-level revision in the app's OHIF mode: MONAI Label's panel, OHIF's brush and SEG export -----------

ORGANS = LABEL_SETS["atlas25"]
PANEL = ".monaiLabelPanel"
SEGMENTATIONS = "window.services.segmentationService"  # OHIF's segmentation service, as the page exposes it
# The labelmap's voxels (segment index per voxel) of the segmentation a model's Run makes (id '1').
VOXELS = f"{SEGMENTATIONS}.getLabelmapVolume('1').voxelManager.getCompleteScalarDataArray()"


@pytest.fixture(scope="module")
def scored(server):
    """The unlabelled series scored (the server's own scoring, run to its end), so Next Sample names organs:
    series UID -> importance record."""
    from monailabel.client import MONAILabelClient

    request = urllib.request.Request(server.url + "/scoring/importance?run_sync=true", data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    urllib.request.urlopen(request, timeout=600).read()
    objects = MONAILabelClient(server.url).datastore()["objects"]
    records = {i: (o.get("image", {}).get("info", {}).get(INFO_KEY) or {}) for i, o in objects.items()}
    records = {i: r for i, r in records.items() if is_scored(r)}
    assert records and all(len(r["organs"]) >= 2 for r in records.values()), records
    return records


def _open_panel(browser: Browser, server, study_uid: str):
    """The app's OHIF mode (/ohif/suprem) on the study, MONAI Label's panel (left, beside OHIF's segmentation
    panel on the right) connected to the test server as an annotator does it: the server's URL typed into
    its Server field, then its connect button."""
    browser.navigate(f"{server.url}/ohif/{REVISION_ROUTE}?StudyInstanceUIDs={study_uid}")
    browser.wait_for("!!(window.cornerstone && cornerstone.getEnabledElements().length)", "the viewports")
    _dismiss_banner(browser)
    browser.wait_for("!!document.getElementById('monailabelServerURL')", "the MONAI Label panel's Server field")
    browser.click("#monailabelServerURL")
    browser.evaluate("document.getElementById('monailabelServerURL').select()")
    browser.type_text(server.url + "/")
    browser.click(f"{PANEL} .settingsTable button")  # the field loses focus first: the panel takes the URL
    _wait(
        lambda: browser.evaluate(f"document.querySelector('{PANEL}').innerText.includes('Active Learning')"),
        "the panel connected (its Active Learning tab; it appends to /info/'s labels, which must be a list)",
        browser,
    )


def _wait(ready, what: str, browser: Browser, timeout: float = 120.0):
    """Polls ``ready()`` until it is truthy; fails after ``timeout`` s naming the page's last errors."""
    end = time.time() + timeout
    while True:
        if ready():
            return
        errors = browser.errors + browser.rejections()
        assert time.time() < end, f"{what}: not seen after {timeout:.0f} s; page errors: {errors[-5:]}"
        time.sleep(1.0)


def _open_tab(browser: Browser, label: str, switch: str):
    """The panel's section ``label`` opened (its label clicked unless its ``switch`` input is checked) and
    seen open before anything in it is clicked."""
    is_open = f"document.querySelector({json.dumps(switch)}).checked"
    if not browser.evaluate(is_open):
        browser.click_text(f"{PANEL} label.tab-label", label)
        browser.wait_for(is_open, f"the panel's {label} section open after a click on its label", 30)


def _next_sample(browser: Browser, strategy: str) -> Dict[str, str]:
    """Next Sample pressed in the panel's Active Learning tab with ``strategy`` chosen in its Strategy list:
    the fields of OHIF's Next Sample dialog (``Study Instance UID``, ``Series Instance UID``, ...). The
    panel asks ``random`` whatever is chosen (its list's onChange, this.onChangeStrategy, is never defined
    in MONAI Label 0.8.5's bundle): accepted here, as the server answers it with ``random_strategy``."""
    _open_tab(browser, "Active Learning", f"{PANEL} .tab-switch[name=activelearning]")
    browser.choose(f"{PANEL} select", strategy)  # the tab's Strategy list is the panel's first
    asked = len(browser.requests_to("/activelearning/"))
    browser.click_text(f"{PANEL} button", "Next Sample")  # where the button is once the panel stops moving
    _wait(lambda: browser.requests_to("/activelearning/")[asked:], "the panel's Next Sample request answered", browser)
    url = browser.requests_to("/activelearning/")[asked:]
    assert url[-1].endswith((f"/activelearning/{strategy}", "/activelearning/random")), url
    text = browser.wait_for("document.querySelector('.nextSampleForm')?.innerText", "OHIF's Next Sample dialog", 60)
    rows = [line.split("\t") for line in text.split("\n")]
    return {r[0].strip(): r[1].strip() for r in rows if len(r) == 2}


def _labelled_voxels(browser: Browser) -> int:
    return browser.evaluate(
        f"(() => {{ if (!{SEGMENTATIONS}.getLabelmapVolume('1')) return 0; const d = {VOXELS}; let n = 0;"
        " for (let i = 0; i < d.length; i++) if (d[i]) n++; return n; })()"
    )


def _run_model(browser: Browser, model: str):
    """Auto-Segmentation's Run with ``model``: the model's label of the study's image drawn in OHIF."""
    _open_tab(browser, "Auto-Segmentation", f"{PANEL} .tab-switch[value=segmentation]")
    chosen = browser.evaluate(f"document.querySelectorAll('{PANEL} select')[1].value")
    assert chosen == model, f"Auto-Segmentation offers {chosen!r} first"
    browser.click_text(f"{PANEL} button", "Run")
    _wait(lambda: _labelled_voxels(browser), f"{model}'s label drawn after Run", browser, 300)


def _brush(browser: Browser, organ: str) -> Dict[str, int]:
    """The annotator's fix, with OHIF's own tools: in the segmentation panel, ``organ``'s row of the model's
    segmentation, the Brush, and a stroke dragged across the middle of the axial viewport. Returns,
    per organ whose voxels the stroke changed (painted over, or painted), how many voxels changed."""
    browser.click_text("[data-cy=data-row] span", organ)
    active = "cornerstoneTools.segmentation.segmentIndex.getActiveSegmentIndex('1')"
    index = browser.wait_for(
        f"(() => {{ const i = {active}; return {SEGMENTATIONS}.getSegmentation('1').segments[i]?.label"
        f" === {json.dumps(organ)} && i; }})()",
        f"{organ}'s segment active after a click on its row",
        30,
    )
    browser.click("[data-cy=Brush]")
    browser.evaluate(f"(() => {{ window.__before = {VOXELS}.slice(); return 1; }})()")
    x, y, w, h = browser.rect(VIEWPORT)  # the first viewport: axial in MONAI Label's MPR layout
    browser.drag([(x + w * (0.35 + 0.03 * i), y + h * 0.5) for i in range(11)])
    changed = browser.wait_for(
        f"(() => {{ const a = window.__before, b = {VOXELS}; const segs = {SEGMENTATIONS}.getSegmentation('1');"
        " const n = {}; for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) for (const v of [a[i], b[i]])"
        " if (v) { const name = segs.segments[v].label; n[name] = (n[name] || 0) + 1; }"
        " return Object.keys(n).length && n; })()",
        "voxels painted by the brush stroke",
        30,
    )
    assert changed.get(organ, 0) > 100, f"the stroke painted {changed.get(organ, 0)} voxels of {organ} ({index})"
    return changed


def _export_seg(browser: Browser, orthanc, name: str):
    """OHIF's own DICOM SEG export of the segmentation to the PACS (STOW through the server's /proxy/dicom),
    from its segmentation panel: the segmentation's menu, Export & Download, Export DICOM SEG, then the
    report-name dialog filled in and saved; the mode's notification says where it went."""
    segs = len(orthanc.find_series(Modality="SEG"))
    menu = browser.evaluate(
        "(() => { const s = Array.from(document.querySelectorAll('button[aria-haspopup=menu]'))"
        " .find(b => b.offsetParent !== null && b.parentElement.innerText.includes('Segmentations'));"
        " if (!s) return null; s.id = s.id || 'segmentation-menu'; return '#' + CSS.escape(s.id); })()"
    )
    assert menu, "no menu button beside the segmentation's name in OHIF's segmentation panel"
    browser.click(menu)
    browser.click_text("[role=menuitem]", "Export & Download")
    browser.click_text("[role=menuitem]", "Export DICOM SEG")
    browser.wait_for("!!document.querySelector('.DraggableItem input')", "OHIF's report-name dialog")
    browser.click(".DraggableItem input")
    browser.type_text(name)
    browser.click(".DraggableItem button[data-cy=Save-btn]")
    browser.wait_for(
        f"document.body.innerText.includes({json.dumps(f'Saved to the PACS as {json.dumps(name)}')})",
        "the export's notification",
        120,
    )
    assert len(orthanc.find_series(Modality="SEG")) == segs + 1, "OHIF's export stored no SEG in the PACS"


def _final_info(server, image_id) -> Dict:
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url).datastore()["objects"][image_id]["labels"]["final"]["info"]


def _revised(info) -> List[str]:
    return sorted(n for n, r in (info.get("organs") or {}).items() if r["state"] == "revised")


@pytest.mark.timeout(900)  # the series scored and a model run on it, on a CPU
def test_ohif_revision_mode_next_sample_brush_and_seg_export_record_the_organs_handed_out_and_changed(
    browser, server, orthanc, scored, shots
):
    """An OHIF annotator's round in the app's mode, with its buttons only: connect MONAI Label's panel,
    choose ``importance``, Next Sample, open the image it names (the mode names the organs handed out), run
    ``segresnet``, paint one organ with
    OHIF's brush, export the DICOM SEG to the PACS from the segmentation panel, Next Sample again. The final
    label then has as revised exactly the organs handed out (no client id: OHIF's panel sends none) and the
    organs the stroke changed against the served pre-annotation, as the trainer sees: the panel's
    ``random`` request was answered by the importance strategy's organ-level hand-out."""
    try:
        _open_panel(browser, server, orthanc.study_uid)
        form = _next_sample(browser, "importance")
        image, study = form["Series Instance UID"], form["Study Instance UID"]
        assert image in scored, f"Next Sample named {image}, not an unlabelled scored series: {form}"
        handed = scored[image]["organs"][:2]
        # The dialog shows no organs; the panel's Info link (/info/) lists them.
        from monailabel.client import MONAILabelClient

        listed = MONAILabelClient(server.url).info()["suprem"]["handouts"]
        assert {"image": image, "client": "anonymous", "organs": handed} in [
            {k: h[k] for k in ("image", "client", "organs")} for h in listed
        ], listed
        # OK reloads OHIF on the study the dialog names (after its confirm, which the browser accepts).
        browser.click(".nextSampleForm button")
        browser.wait_for(f"location.href.endsWith({json.dumps(study)})", "OHIF reloaded on the study handed out")
        assert f"/ohif/{REVISION_ROUTE}?" in browser.evaluate("location.href"), "OHIF left the app's mode"
        # There the mode says which organs were handed out (read from /info/), as the dialog does not.
        said = json.dumps(", ".join(handed))
        browser.wait_for(
            f"document.body.innerText.includes('SuPreM: organs to revise') && document.body.innerText.includes({said})"
            " && document.body.innerText.includes('held until')",
            f"the mode's notice of the organs handed out ({said})",
            60,
        )
        notice_seen = time.monotonic()
        _open_panel(browser, server, study)
        _run_model(browser, "segresnet")
        drawn = next(n for n in ORGANS if n not in handed)
        stroke = _brush(browser, drawn)
        _export_seg(browser, orthanc, "organ revision")
        # The notice stays while the hold lasts (30 min; OHIF's own notifications go after seconds).
        time.sleep(max(0.0, 25.0 - (time.monotonic() - notice_seen)))
        assert browser.evaluate(f"document.body.innerText.includes({said})"), "the organs' notice went away"
        _next_sample(browser, "importance")  # reads the SEG while the hand-out is open
    finally:
        browser.screenshot(str(shots / "panel-revision.png"))
    changed = [n for n in ORGANS if n in stroke]  # painted, and painted over
    info = _final_info(server, image)
    assert _revised(info) == sorted(set(handed) | set(changed)), (stroke, info.get("organs"), server.log_tail(20))
    assert info["revised_from"] == {"handed_out": handed, "changed": changed}
    assert trainer_view(server.cache, ORGANS)[image] == sorted(set(handed) | set(changed))

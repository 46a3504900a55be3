"""The OHIF viewer that MONAI Label serves at /ohif/, opened in headless Chromium on a study in Orthanc.

A real Orthanc (DICOMweb plugin) holds the shared CT series; a real ``monailabel start_server`` runs on
it, and OHIF reaches Orthanc through the server's /proxy/dicom (its bundled app-config.js). Chromium is
driven over the DevTools protocol (tests/ohif_support.py). The study list must show the study and link
the viewer to it; the viewer (/ohif/viewer?StudyInstanceUIDs=...) must draw the series' own pixels where
its world-to-canvas mapping puts them; and a label saved through MONAI Label must come back from Orthanc
as a DICOM SEG that OHIF lists under the app's segment names and tints onto the SEG's pixels of the
shown slice. Screenshots stay in the test's temporary folder and are named in failure messages."""

from __future__ import annotations

import io
import json
import os
import urllib.request

import nibabel as nib
import numpy as np
import pytest

from dicomweb_support import loaded_orthanc, orthanc_missing
from lib.classes import CLASS_INDEX, LABEL_SETS, TOTALSEG_TO_SUPREM, mapping_lut
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
from support import Server, shared_path, write_synthetic_checkpoint

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
    with loaded_orthanc(str(tmp_path_factory.mktemp("orthanc")), series_dir) as o:
        o.series_description = str(pydicom.dcmread(o.files[0], stop_before_pixels=True).SeriesDescription)
        yield o


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    write_synthetic_checkpoint("segresnet", str(work / "weights" / "supervised_suprem_segresnet_2100.pth"))
    srv = Server(
        orthanc.dicomweb,
        {
            "models": "segresnet",
            "weights_dir": str(work / "weights"),
            "model_dir": str(work / "model"),
            "use_pretrained_model": "false",
        },
        str(work),
        env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicom-cache")},
    )
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


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
    viewer = f"{server.url}/ohif/viewer?StudyInstanceUIDs={orthanc.study_uid}"
    assert viewer in links, f"no link to {viewer} in the study row: {links} (screenshot: {shot})"


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

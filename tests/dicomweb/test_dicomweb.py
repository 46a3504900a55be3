"""The app on a DICOMweb server: a real Orthanc (DICOMweb plugin) holding the shared CT series.

MONAI Label runs with ``--studies http://127.0.0.1:<orthanc>/dicom-web``; the series is listed,
segmented on its own grid, and a final label goes back to Orthanc as a DICOM SEG whose segments,
names and geometry are read back here.
"""

from __future__ import annotations

import json
import os
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from dicomweb_support import dicomweb_server, loaded_orthanc, orthanc_missing
from lib.classes import CLASS_INDEX, LABEL_SETS, TOTALSEG_TO_SUPREM, mapping_lut
from support import shared_path

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(orthanc_missing() is not None, reason=orthanc_missing() or ""),
]

ATLAS25 = {CLASS_INDEX[n]: n for n in LABEL_SETS["atlas25"]}


@pytest.fixture(scope="module")
def series_dir():
    return shared_path("data", "totalseg-example", "dicom")


@pytest.fixture(scope="module")
def reference_label():
    """TotalSegmentator's label of the series (its grid is the series' grid)."""
    return nib.load(shared_path("data", "totalseg-example", "dicom-seg.nii.gz"))


@pytest.fixture(scope="module")
def orthanc(series_dir, tmp_path_factory):
    with loaded_orthanc(str(tmp_path_factory.mktemp("orthanc")), series_dir) as o:
        yield o


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    with dicomweb_server(orthanc, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))


@pytest.fixture(scope="module")
def inferred(client, orthanc, server):
    """segresnet's label of the series, fetched once for the tests below."""
    try:
        label_file, params = client.infer("segresnet", orthanc.series_uid, {})
    except Exception:
        print(server.log_tail())
        raise
    return nib.load(label_file), params


def _corners(img):
    shape = np.array(img.shape) - 1
    pts = [img.affine @ np.r_[np.array(c) * shape, 1.0] for c in np.ndindex(2, 2, 2)]
    return sorted(tuple(np.round(p[:3], 1)) for p in pts)


def _on_grid_of(arr: np.ndarray, src: nib.Nifti1Image, dst: nib.Nifti1Image) -> np.ndarray:
    """``arr`` (on ``src``'s voxel grid) re-ordered onto ``dst``'s grid: the same world positions,
    when the two grids differ only by axis order and flips."""
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    out = apply_orientation(arr, ornt_transform(io_orientation(src.affine), io_orientation(dst.affine)))
    assert out.shape == dst.shape
    return out


def test_datastore_lists_the_series_by_its_series_uid(client, server, orthanc):
    with urllib.request.urlopen(server.url + "/datastore/?output=stats", timeout=60) as r:
        stats = json.load(r)
    assert stats["total"] == 1, stats
    sample = client.next_sample("random", {})
    assert sample["id"] == orthanc.series_uid, sample


def test_infer_on_the_series_returns_a_label_on_the_series_grid(inferred, reference_label, orthanc, client):
    lab, params = inferred
    assert lab.shape == reference_label.shape == (512, 512, 20)
    assert _corners(lab) == _corners(reference_label)
    values = set(np.unique(np.asarray(lab.dataobj)).tolist())
    assert values <= set(range(26)), values
    assert params["label_names"]["liver"] == CLASS_INDEX["liver"]
    # The series now sits in MONAI Label's cache, under its series UID.
    assert orthanc.series_uid in client.datastore()["objects"]


def _label_info(values):
    """What a viewer sends with a label it saves to DICOMweb: one entry per segment, in the order of the
    label's sorted non-zero values (MONAI Label's nifti_to_dicom_seg pairs them by position)."""
    from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

    info = []
    for v in sorted(values):
        name = ATLAS25[v]
        color = GENERIC_ANATOMY_COLORS.get(name.replace("_", " "), (128 + 4 * v, 255 - 8 * v, 60 + 7 * v))
        info.append({"name": name, "idx": int(v), "color": list(color), "description": name.replace("_", " ")})
    return info


def _seg_ids(orthanc):
    return {s["ID"] for s in orthanc.find_series(Modality="SEG")}


def _save(client, server, orthanc, path, params):
    """Save ``path`` as the series' final label; the DICOM SEG series it added to Orthanc (pydicom), or None."""
    import io

    import pydicom

    before = _seg_ids(orthanc)
    try:
        res = client.save_label(orthanc.series_uid, path, tag="final", params=params)
    except Exception:
        print(server.log_tail(40))
        raise
    new = sorted(_seg_ids(orthanc) - before)
    assert len(new) <= 1, new
    if not new:
        return res, None
    instances = orthanc.series_instances(new[0])
    assert len(instances) == 1, instances
    return res, pydicom.dcmread(io.BytesIO(orthanc.instance_file(instances[0]["ID"])))


def _mapped_reference(reference_label, grid):
    """TotalSegmentator's label of the series as SuPreM classes, on ``grid`` (the cached image's grid)."""
    lut = np.array(mapping_lut(TOTALSEG_TO_SUPREM), np.uint8)
    mapped = lut[np.asarray(reference_label.dataobj).astype(np.int64)]
    return _on_grid_of(mapped, reference_label, grid)


@pytest.fixture(scope="module")
def saved(client, server, orthanc, inferred, reference_label, tmp_path_factory):
    """TotalSegmentator's label of the series, mapped to SuPreM classes, saved as the final label."""
    lab, _ = inferred
    arr = _mapped_reference(reference_label, lab)  # the infer result's grid = the cached image's grid
    path = str(tmp_path_factory.mktemp("label") / "final.nii.gz")
    nib.save(nib.Nifti1Image(arr, lab.affine), path)
    values = sorted(set(np.unique(arr).tolist()) - {0})
    assert len(values) >= 3, values  # a real multi-organ label
    res, seg = _save(client, server, orthanc, path, {"label_info": _label_info(values)})
    assert seg is not None, "no DICOM SEG reached Orthanc"
    return {"path": path, "values": values, "response": res, "seg": seg}


def test_a_final_label_is_stored_in_orthanc_as_dicom_seg(saved, orthanc):
    seg = saved["seg"]
    assert seg.Modality == "SEG" and seg.SeriesDescription == "SuPreM revised label"
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.StudyInstanceUID == orthanc.study_uid  # filed under the image's study
    assert seg.SeriesInstanceUID != orthanc.series_uid
    assert saved["response"]["image"] == orthanc.series_uid
    # The source series, as MONAI Label finds labelled images: ReferencedSeriesSequence.
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == orthanc.series_uid
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    sources = {os.path.basename(f)[: -len(".dcm")] for f in orthanc.files}
    assert referenced <= sources and referenced


def test_dicom_seg_has_one_named_segment_per_label_value(saved, orthanc):
    seg = saved["seg"]
    segments = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    names = [segments[k] for k in sorted(segments)]
    assert names == [ATLAS25[v] for v in saved["values"]]


def _seg_volume(seg, z_positions):
    """{segment number: boolean volume (z, row, col)} from the SEG's frames, slices at ``z_positions``."""
    import pydicom  # noqa: F401  (pixel_array needs pydicom's handlers)

    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    vols = {}
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        z = float(fg.PlanePositionSequence[0].ImagePositionPatient[2])
        k = int(np.argmin(np.abs(np.asarray(z_positions) - z)))
        assert abs(z_positions[k] - z) < 1e-2, (z, z_positions)
        vols.setdefault(number, np.zeros((len(z_positions),) + frames.shape[1:], bool))[k] |= frames[i].astype(bool)
    return vols


def test_dicom_seg_has_the_series_geometry_and_the_label_voxels(saved, orthanc):
    import pydicom

    seg = saved["seg"]
    src = [pydicom.dcmread(f, stop_before_pixels=True) for f in orthanc.files]
    src.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    assert (int(seg.Rows), int(seg.Columns)) == (512, 512)
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(x) for x in src[0].ImageOrientationPatient],
        atol=1e-4,
    )
    np.testing.assert_allclose(
        [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing], [float(x) for x in src[0].PixelSpacing], atol=1e-4
    )
    z = [float(d.ImagePositionPatient[2]) for d in src]
    for fg in seg.PerFrameFunctionalGroupsSequence:  # every frame lies on a source slice (x, y too)
        pos = [float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient]
        k = int(np.argmin(np.abs(np.asarray(z) - pos[2])))
        np.testing.assert_allclose(pos, [float(x) for x in src[k].ImagePositionPatient], atol=1e-2)
    n_frames = int(seg.NumberOfFrames)
    assert n_frames == len(seg.PerFrameFunctionalGroupsSequence) and 1 <= n_frames <= len(saved["values"]) * len(src)

    # Voxels: the saved label, in DICOM order (slice, row, column), segment by segment.
    lab = nib.load(saved["path"])
    arr = np.asarray(lab.dataobj)
    # The DICOM grid as a NIfTI-style affine (LPS rows/columns -> RAS) to re-order the label onto it.
    row = np.array([float(x) for x in src[0].ImageOrientationPatient[:3]])
    col = np.array([float(x) for x in src[0].ImageOrientationPatient[3:]])
    dr, dc = (float(x) for x in src[0].PixelSpacing)
    step = np.subtract([float(x) for x in src[1].ImagePositionPatient], [float(x) for x in src[0].ImagePositionPatient])
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    dicom_affine = np.eye(4)  # voxel (column i, row j, slice k) -> RAS
    dicom_affine[:3, 0] = lps_to_ras @ (row * dc)
    dicom_affine[:3, 1] = lps_to_ras @ (col * dr)
    dicom_affine[:3, 2] = lps_to_ras @ step
    dicom_affine[:3, 3] = lps_to_ras @ np.array([float(x) for x in src[0].ImagePositionPatient])
    on_dicom = _on_grid_of(arr, lab, nib.Nifti1Image(np.zeros((512, 512, len(src)), np.uint8), dicom_affine))
    on_dicom = np.transpose(on_dicom, (2, 1, 0))  # (column, row, slice) -> (slice, row, column)
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    vols = _seg_volume(seg, z)
    for v in saved["values"]:
        got = vols.get(numbers[ATLAS25[v]], np.zeros(on_dicom.shape, bool))
        want = on_dicom == v
        assert int(want.sum()) > 0
        assert np.array_equal(got, want), (ATLAS25[v], int(got.sum()), int(want.sum()), int((got & want).sum()))


# --- what does not work yet: app changes needed (see each reason) -------------------------------------
# (in file order: the fresh server reads Orthanc before the tests below add more SEGs)

@pytest.fixture(scope="module")
def fresh_server(saved, orthanc, tmp_path_factory):
    """A second server on the same Orthanc with an empty cache (another machine, or a new cache folder):
    it knows the final label only as the DICOM SEG in Orthanc."""
    with dicomweb_server(orthanc, tmp_path_factory.mktemp("fresh")) as srv:
        yield srv


SEG_NUMBERS = (
    "MONAI Label reads a DICOM SEG back (dicom_seg_to_itk_image, pydicom_seg MultiClassReader) as segment "
    "numbers 1..n, not the label values: the app must map segments back to its classes by SegmentLabel"
)


def test_a_fresh_server_reads_the_final_label_back_with_the_app_classes(fresh_server, saved, orthanc):
    import SimpleITK as sitk

    with urllib.request.urlopen(fresh_server.url + "/datastore/?output=train", timeout=120) as r:
        datalist = json.load(r)
    entries = [d for d in datalist if orthanc.series_uid in os.path.basename(d["image"])]
    assert len(entries) == 1, datalist
    got = sitk.ReadImage(entries[0]["label"])
    want = sitk.ReadImage(saved["path"])
    assert got.GetSize() == want.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-2)
    np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-4)
    g, w = sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want)
    assert sorted(set(np.unique(g).tolist()) - {0}) == saved["values"]
    assert np.array_equal(g, w)


STALE_CACHE = (
    "MONAI Label's DICOMWebDatastore caches get_labeled_images()/list_images() for "
    "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY (7200 s); /info/ fills that cache at start-up, so a saved SEG is "
    "not seen: the app must clear the cache after saving a final label"
)


def test_the_series_counts_as_labelled_after_the_save(saved, server):
    with urllib.request.urlopen(server.url + "/datastore/?output=stats", timeout=60) as r:
        stats = json.load(r)
    assert stats["total"] == 1 and stats["completed"] == 1, stats


def test_the_app_counts_the_final_label_for_rounds(saved, client):
    rounds = client.info()["suprem"]["rounds"]
    assert rounds["labels_since_round"] == 1, rounds


@pytest.mark.parametrize("sent", ["no_label_info", "every_app_label"])
def test_segments_get_the_app_names_whatever_label_info_the_client_sends(
    sent, saved, client, server, orthanc, tmp_path
):
    lab = nib.load(saved["path"])
    arr = np.asarray(lab.dataobj)
    params = {} if sent == "no_label_info" else {"label_info": _label_info(sorted(ATLAS25))}
    _, seg = _save(client, server, orthanc, saved["path"], params)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    assert [names[k] for k in sorted(names)] == [ATLAS25[v] for v in sorted(set(np.unique(arr).tolist()) - {0})]


@pytest.mark.parametrize(
    "case, words",
    [("foreign_values", "not classes of this app's label set"), ("wrong_shape", "does not match the image shape")],
)
def test_a_bad_label_is_refused_and_nothing_reaches_orthanc(case, words, saved, client, server, orthanc, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    lab = nib.load(saved["path"])
    arr = np.asarray(lab.dataobj).copy()
    path = str(tmp_path / f"{case}.nii.gz")
    if case == "foreign_values":
        arr[:5, :5, :5] = 77
        nib.save(nib.Nifti1Image(arr, lab.affine), path)
    else:
        nib.save(nib.Nifti1Image(arr[:-1], lab.affine), path)
    before = _seg_ids(orthanc)
    with pytest.raises(MONAILabelClientException) as err:
        client.save_label(orthanc.series_uid, path, tag="final", params={})
    after = _seg_ids(orthanc)
    assert after == before, "a refused label must not reach Orthanc"
    assert "Status: 422;" in err.value.msg and words in err.value.msg, err.value.msg

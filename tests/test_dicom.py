"""DICOM in: photos a clinic's fundus camera writes (Ophthalmic Photography) read like JPEG/PNG files,
patient and eye from the tags, refusals with the reason, and a screened folder of DICOM files that
gives the same patient rows as the same photos as JPEG (or PNG) files.

The DICOM files are made here with pydicom from synthetic photos, as a camera would write them.
"""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from retino.data.dicom import patient_eye_from_dicom
from retino.data.preprocess import ImageError, load_image
from retino.data.synthetic import render_fundus
from retino.screening.screen import screen
from test_screen import GOOD, PHOTO, fresh_run

OPHTHALMIC_PHOTOGRAPHY_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def write_dicom(path: Path, rgb: np.ndarray | None, *, jpeg: bytes | None = None, photometric: str = "RGB",
                modality: str = "OP", patient: str = "", laterality: str = "", laterality_tag="ImageLaterality",
                frames: int = 1) -> Path:
    """A single-frame 8-bit colour DICOM file as a fundus camera exports one."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPHTHALMIC_PHOTOGRAPHY_8BIT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg is not None else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, patient
    if laterality:
        setattr(ds, laterality_tag, laterality)
    if rgb is not None:
        h, w = rgb.shape[:2]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = h, w, 3, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PhotometricInterpretation = photometric
        if frames > 1:
            ds.NumberOfFrames = frames
        if jpeg is not None:
            ds.PixelData = encapsulate([jpeg] * frames)
            ds["PixelData"].VR = "OB"
        else:
            data = convert_color_space(rgb, "RGB", photometric) if photometric != "RGB" else rgb
            ds.PixelData = np.ascontiguousarray(data).tobytes() * frames
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return render_fundus(3, eye="left", size=96, seed=1)[0]


def test_uncompressed_rgb_reads_as_its_pixels(photo, tmp_path):
    img = load_image(write_dicom(tmp_path / "a.dcm", photo, patient="p1", laterality="L"))
    assert img.mode == "RGB" and img.info["warnings"] == []
    np.testing.assert_array_equal(np.asarray(img), photo)


def test_ybr_full_is_converted_to_rgb(photo, tmp_path):
    got = np.asarray(load_image(write_dicom(tmp_path / "a.dcm", photo, photometric="YBR_FULL")), dtype=int)
    assert np.abs(got - photo.astype(int)).max() <= 2  # one rounding each way through YCbCr
    assert np.abs(np.asarray(load_image(write_dicom(tmp_path / "b.dcm", photo)), dtype=int) - got).max() <= 2


@pytest.mark.parametrize("target", [None, 24])
def test_jpeg_baseline_decodes_as_the_jpeg_file_does(photo, tmp_path, target):
    data = jpeg_bytes(photo)
    (tmp_path / "a.jpeg").write_bytes(data)
    dcm = write_dicom(tmp_path / "a.dcm", photo, jpeg=data, photometric="YBR_FULL_422")
    as_jpeg, as_dicom = load_image(tmp_path / "a.jpeg", target=target), load_image(dcm, target=target)
    assert as_dicom.size == as_jpeg.size and (target is None or as_dicom.size[0] < photo.shape[1])
    np.testing.assert_array_equal(np.asarray(as_dicom), np.asarray(as_jpeg))


@pytest.mark.parametrize("kind, message", [
    ("frames", "holds 2 frames"),
    ("no pixels", "holds no pixel data"),
    ("CT", "Modality CT is not a photograph"),
    ("OPT", "Modality OPT is not a photograph"),
    ("no modality", "no Modality is not a photograph"),
    ("cut short", "pixel data (Explicit VR Little Endian) cannot be decoded"),
])
def test_refusals_name_the_file_and_the_reason(photo, tmp_path, kind, message):
    path = tmp_path / "scan.dcm"
    if kind == "frames":
        write_dicom(path, photo, frames=2)
    elif kind == "no pixels":
        write_dicom(path, None)
    elif kind == "cut short":  # a copy that stopped half-way through the pixels
        good = write_dicom(tmp_path / "good.dcm", photo).read_bytes()
        path.write_bytes(good[:len(good) // 2])
    else:
        write_dicom(path, photo, modality="" if kind == "no modality" else kind)
    with pytest.raises(ImageError) as e:
        load_image(path)
    assert message in str(e.value) and str(e.value).startswith("scan.dcm: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("name, tags, expected", [
    ("IMG0001.dcm", {"patient": "P-17", "laterality": "R"}, ("P-17", "right")),
    ("IMG0001.dcm", {"patient": "P-17", "laterality": "L", "laterality_tag": "Laterality"}, ("P-17", "left")),
    ("IMG0001.dcm", {"patient": "P-17", "laterality": "B"}, ("P-17", None)),  # both eyes: no one eye
    ("44_left.dcm", {"patient": "P-17"}, ("P-17", "left")),  # the tags lack the eye: the name's
    ("44_left.dcm", {}, ("44", "left")),                      # no tags: the file-name rule
    ("IMG0002.dcm", {}, ("IMG0002", None)),                   # neither: its own patient, as a JPEG is
])
def test_patient_and_eye_come_from_the_tags_then_the_name(photo, tmp_path, name, tags, expected):
    path = write_dicom(tmp_path / name, photo, **tags)
    assert patient_eye_from_dicom(path, name) == expected


@pytest.mark.parametrize("encoding", ["jpeg", "uncompressed"])
def test_screened_dicom_folder_gives_the_patient_rows_of_the_same_photos(tmp_path_factory, tmp_path, encoding):
    """JPEG-baseline DICOM against the JPEG files; uncompressed DICOM against the same pixels as PNG."""
    run = fresh_run(tmp_path_factory.mktemp("dicom-runs") / "20260101-000000-classify")
    plain, dicom = tmp_path / "plain", tmp_path / "dicom"
    for i, (name, grade) in enumerate(GOOD.items()):
        eye = "left" if "left" in name else "right"
        rgb = render_fundus(grade, eye=eye, size=PHOTO, seed=i)[0]
        patient = Path(name).stem.split("_")[0]
        data = jpeg_bytes(rgb)
        target = plain / (name if encoding == "jpeg" else f"{Path(name).with_suffix('')}.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        if encoding == "jpeg":
            target.write_bytes(data)
        else:
            Image.fromarray(rgb).save(target, format="PNG")
        # a camera's names say nothing: the patient and the eye are only in the tags
        write_dicom(dicom / f"IMG{i:04d}.dcm", rgb, jpeg=data if encoding == "jpeg" else None,
                    photometric="YBR_FULL_422" if encoding == "jpeg" else "RGB", patient=patient,
                    laterality=eye[0].upper())
    a = screen(run, plain, tmp_path / "plain.csv", workers=0)
    b = screen(run, dicom, tmp_path / "dicom.csv", workers=0)
    assert len(b.photos) == len(GOOD) and (b.photos["error"].fillna("") == "").all()
    assert sorted(b.patients["patient"]) == ["1", "2", "3"]
    assert (b.patients == a.patients).all().all(), (a.patients, b.patients)
    key = ["patient", "eye", "grade", "referable"]
    np.testing.assert_allclose(b.photos.sort_values(["patient", "eye"])["referable_score"],
                               a.photos.sort_values(["patient", "eye"])["referable_score"], rtol=1e-5)
    assert (b.photos.sort_values(["patient", "eye"])[key].to_numpy()
            == a.photos.sort_values(["patient", "eye"])[key].to_numpy()).all()


def test_predict_grades_a_dicom_file_as_its_jpeg(tmp_path_factory, tmp_path):
    """Predict (path, and bytes as the page's upload gives them) reads DICOM with no caller change."""
    from retino.inference.predict import predict
    run = fresh_run(tmp_path_factory.mktemp("dicom-runs") / "20260101-000000-classify")
    rgb = render_fundus(3, eye="right", size=PHOTO, seed=5)[0]
    data = jpeg_bytes(rgb)
    (tmp_path / "7_right.jpeg").write_bytes(data)
    dcm = write_dicom(tmp_path / "scan.dcm", rgb, jpeg=data, photometric="YBR_FULL_422", patient="7", laterality="R")
    as_jpeg, as_path, as_upload = predict(run, [tmp_path / "7_right.jpeg", dcm, dcm.read_bytes()])
    assert as_jpeg.error is None and as_path.error is None and as_upload.error is None
    np.testing.assert_allclose(as_path.probs, as_jpeg.probs, rtol=1e-5)
    np.testing.assert_allclose(as_upload.probs, as_jpeg.probs, rtol=1e-5)
    multi = write_dicom(tmp_path / "video.dcm", rgb, frames=2)
    (refused,) = predict(run, [multi])
    assert refused.grade is None and "holds 2 frames" in refused.error

"""DICOM input with the real test files pydicom ships (CT_small.dcm, MR_small.dcm, ...)."""
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from medv_jax.data import dicom, image_io  # noqa: E402
from medv_jax.data import image as image_lib  # noqa: E402


def gray(path, **kw):
    out = np.asarray(dicom.read_dicom(path, **kw))
    assert out.dtype == np.uint8 and out.ndim == 3 and (out[..., 0] == out[..., 2]).all()
    return out[..., 0]


CT = get_testdata_file("CT_small.dcm")  # MONOCHROME2, slope 1, intercept -1024, no window
MR = get_testdata_file("MR_small.dcm")  # MONOCHROME2, no rescale, window center 600 / width 1600


def test_ct_rescale_and_named_windows_hand_checked():
    raw = pydicom.dcmread(CT).pixel_array
    assert raw[0, 48] == 958 and raw[64, 60] == 2189  # -> -66 HU and 1165 HU after the intercept
    # DICOM linear window: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped, rounded
    # soft tissue (40, 400) at -66 HU: ((-66 - 39.5) / 399 + 0.5) * 255 = 60.08 -> 60
    assert gray(CT, window="soft_tissue")[0, 48] == 60
    # lung (-600, 1500) at -66 HU: ((-66 + 600.5) / 1499 + 0.5) * 255 = 218.43 -> 218
    assert gray(CT, window="lung")[0, 48] == 218
    # bone (400, 1800) at 1165 HU: ((1165 - 399.5) / 1799 + 0.5) * 255 = 236.01 -> 236
    assert gray(CT, window="bone")[64, 60] == 236
    # brain (40, 80): -66 HU is below 0.5 - 39.5 + 40 -> 0; 1165 HU -> 255
    b = gray(CT, window="brain")
    assert b[0, 48] == 0 and b[64, 60] == 255
    assert gray(CT, window=(40.0, 400.0)).tolist() == gray(CT, window="soft_tissue").tolist()


def test_ct_without_file_window_uses_full_range():
    raw = pydicom.dcmread(CT).pixel_array.astype(float)
    g = gray(CT)
    np.testing.assert_array_equal(g, gray(CT, window="full"))
    assert g.min() == 0 and g.max() == 255
    expect = np.round((raw - raw.min()) * (255 / (raw.max() - raw.min())))
    np.testing.assert_array_equal(g, expect)


def test_mr_uses_file_window_hand_checked():
    raw = pydicom.dcmread(MR).pixel_array
    assert raw[0, 0] == 905 and raw[32, 32] == 182
    g = gray(MR)  # window 600 / 1600 from the file
    assert g[0, 0] == 176  # ((905 - 599.5) / 1599 + 0.5) * 255 = 176.22
    assert g[32, 32] == 61  # ((182 - 599.5) / 1599 + 0.5) * 255 = 60.92
    np.testing.assert_array_equal(g, gray(MR, window="auto"))
    assert not np.array_equal(g, gray(MR, window="full"))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    np.testing.assert_array_equal(gray(path), 255 - gray(MR))
    np.testing.assert_array_equal(gray(path, window="full"), 255 - gray(MR, window="full"))


def test_voi_lut_functions():
    x = np.array([-100.0, 0.0, 50.0, 100.0, 1000.0])
    # LINEAR: ((x - 49.5) / 99 + 0.5) * 255 -> 0 at x = 0, 128.79 at the centre
    assert dicom.window_to_uint8(x, 50, 100).tolist() == [0, 0, 129, 255, 255]
    assert dicom.window_to_uint8(x, 50, 100, "LINEAR_EXACT").tolist() == [0, 0, 128, 255, 255]
    assert dicom.window_to_uint8(x, 50, 100, "SIGMOID").tolist() == [1, 30, 128, 225, 255]


def test_multiframe_chooses_a_frame():
    path = get_testdata_file("rtdose.dcm")  # 15 frames
    frames = pydicom.dcmread(path).pixel_array.astype(float)

    def full(f):
        return np.round((f - f.min()) * (255 / (f.max() - f.min())))

    np.testing.assert_array_equal(gray(path, frame=3), full(frames[3]))
    np.testing.assert_array_equal(gray(path), full(frames[7]))  # default: the middle frame
    np.testing.assert_array_equal(gray(path, frame=-1), full(frames[14]))
    with pytest.raises(ValueError, match="frame 15 out of range.*rtdose.dcm"):
        dicom.read_dicom(path, frame=15)


def test_compressed_syntaxes():
    # RLE is decoded by pydicom itself: same image as the uncompressed file
    np.testing.assert_array_equal(gray(get_testdata_file("MR_small_RLE.dcm")), gray(MR))
    # JPEG-LS needs a plugin: decoded when one is installed, otherwise a clear error naming the file
    path = get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    try:
        pydicom.dcmread(path).pixel_array
    except Exception:
        with pytest.raises(image_io.ImageReadError, match=r"MR_small_jpeg_ls_lossless\.dcm.*JPEG-LS"):
            dicom.read_dicom(path)
    else:
        np.testing.assert_array_equal(gray(path), gray(MR))


def test_colour_and_palette_dicom():
    rgb_path = get_testdata_file("examples_rgb_color.dcm")
    got = np.asarray(dicom.read_dicom(rgb_path))
    np.testing.assert_array_equal(got, pydicom.dcmread(rgb_path).pixel_array)
    pal = np.asarray(dicom.read_dicom(get_testdata_file("examples_palette.dcm")))
    assert pal.shape == (350, 800, 3) and pal.dtype == np.uint8 and len(np.unique(pal.reshape(-1, 3), axis=0)) > 2


def test_dcm_path_anywhere_an_image_is_accepted():
    got = image_lib.preprocess_image(CT, "anyres_max_4", dicom_window="lung")
    assert got.pixels.shape == (2, 384, 384, 3)  # 128 x 128: base view + a 1x1 grid
    via_loader = np.asarray(image_io.load_image(CT, dicom_window="lung"))
    np.testing.assert_array_equal(via_loader, np.asarray(dicom.read_dicom(CT, window="lung")))


def test_errors_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown DICOM window 'liver'"):
        dicom.read_dicom(CT, window="liver")
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(image_io.ImageReadError, match="broken.dcm"):
        image_io.load_image(bad)
    with pytest.raises(image_io.ImageReadError, match="rtplan.dcm.*no pixel data"):
        dicom.read_dicom(get_testdata_file("rtplan.dcm"))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if pydicom were not installed
    with pytest.raises(ImportError, match=r"medv_jax\[dicom\]"):
        dicom.read_dicom(CT)

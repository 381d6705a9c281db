"""Explanations: maps in the input's own geometry (shape, affine, location), resumable file sets,
two shards into one folder."""

import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from mmai.clinical.preprocess import FeatureSpec
from mmai.config import ImageConfig, IntensityConfig
from mmai.data.dataset import ImageLoader
from mmai.inference import explain as E
from mmai.models.heads import outputs_to_predictions
from mmai.models.registry import create_model

SPECS = [FeatureSpec("age", "numeric"), FeatureSpec("crp", "numeric")]
NATIVE_AFFINE = np.array([[-1.2, 0, 0, 80.0], [0, 1.0, 0, -40.0], [0, 0, 2.5, 15.0], [0, 0, 0, 1.0]])  # x flipped
NATIVE_SHAPE = (40, 36, 20)
BOX = (slice(8, 20), slice(10, 22), slice(6, 14))  # the only non-air voxels of every case


class StubPredictor:
    """What explain_cases uses of a Predictor: members (spec, model), encoding, pre, load_image, config,
    _clinical, spec.roi_sources."""

    def __init__(self, windows: bool, model_id: str = "m1") -> None:
        torch.manual_seed(0)
        w = {"roi_size": [16, 16, 16], "overlap": 0.25, "batch": 3} if windows else None
        self.model = create_model("cross_attention", n_outputs=1, feature_specs=SPECS, widths=(4, 8, 8, 16), dim=16,
                                  heads=2, windows=w).eval()
        with torch.no_grad():  # a trained model reads the image: the fused term starts at 0 (docs/models.md)
            torch.nn.init.normal_(self.model.head.fc.weight, std=0.5)
        self.cfg = ImageConfig(spacing=(2.0, 2.0, 2.0), size=(24, 24, 16), antialias=False,  # exact air: 0
                               intensity=IntensityConfig(a_min=-1000.0, a_max=1000.0))
        self.config = SimpleNamespace(image=self.cfg, task=SimpleNamespace(target="label"))
        self.loader = ImageLoader(self.cfg)
        self.encoding = SimpleNamespace(kind="binary", classes=["0", "1"])
        self.pre = SimpleNamespace(feature_names=["age", "crp"])
        self.device, self.uses_image, self.model_id = "cpu", True, model_id
        probs = lambda out: outputs_to_predictions("binary", out).numpy()  # noqa: E731 - RunSpec.predictions
        self.members = [(SimpleNamespace(clinical=self.pre, predictions=probs), self.model)]
        self.spec = SimpleNamespace(roi_sources=lambda df, base: [None] * len(df))
        self.base_dir = None

    def load_image(self, row, roi):
        return self.loader.load(row["image"], roi=roi)

    def with_descriptors(self, df):  # no lesion mask: no descriptors
        return df

    def _clinical(self, df, errors, pre=None, ok=None):
        v = df[["age", "crp"]].to_numpy(np.float32)
        m = np.isfinite(v).astype(np.float32)
        return np.nan_to_num(v), m, ok if ok is not None else [True] * len(df)


def cohort(tmp: Path, n: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arr = np.full(NATIVE_SHAPE, -1000.0, np.float32)
        arr[BOX] = rng.normal(200, 150, size=arr[BOX].shape)
        path = tmp / f"c{i}.nii.gz"
        nib.save(nib.Nifti1Image(arr, NATIVE_AFFINE), str(path))
        rows.append({"case_id": f"c{i}", "image": str(path), "age": float(i), "crp": np.nan if i == 2 else 1.0})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("windows", [False, True])
def test_maps_are_in_the_input_geometry(tmp_path, windows):
    df = cohort(tmp_path, n=1)
    out = tmp_path / "x"
    E.explain_cases(StubPredictor(windows), df, out, progress=False)
    for kind in ("saliency", "attention"):
        img = nib.load(out / f"c0_{kind}.nii.gz")
        assert img.shape == NATIVE_SHAPE
        np.testing.assert_allclose(img.affine, NATIVE_AFFINE, atol=1e-5)
        data = np.asarray(img.dataobj)
        assert data.min() >= 0 and data.max() == pytest.approx(1.0, abs=1e-6)
    sal = np.asarray(nib.load(out / "c0_saliency.nii.gz").dataobj)
    # |grad x input| is 0 on air (0 after the window): the map lies on the box, in native voxels
    inside = np.zeros(NATIVE_SHAPE, bool)
    inside[tuple(slice(s.start - 2, s.stop + 2) for s in BOX)] = True
    assert sal[~inside].max() < 1e-6 and sal[BOX].mean() > 0.01
    assert (out / "c0_overview.png").stat().st_size > 1000
    assert not list(out.glob(".*"))  # no temporary files


def test_stitched_windows_equal_the_attention_of_one_window(tmp_path):
    """With a window as large as the model grid, the stitched map is the plain upsampled map."""
    p = StubPredictor(True)
    tok = p.model.windows
    tok.roi_size = (24, 24, 16)
    image = torch.rand(1, 1, 24, 24, 16)
    with torch.no_grad():
        p.model(image, torch.ones(1), torch.zeros(1, 2), torch.ones(1, 2))
    stitched = E.attention_map(p.model, (24, 24, 16))
    grid = p.model.last_grid.fmap_shape
    plain = torch.nn.functional.interpolate(p.model.last_attention[:, 0, 1:].reshape(1, 1, *grid),
                                            size=(24, 24, 16), mode="trilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(stitched, plain, atol=1e-6, rtol=1e-5)


def _mtimes(out: Path, cases) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for c in cases for p in E.case_files(out, c).values() if p.exists()}


def test_kill_and_rerun_makes_exactly_the_missing_cases(tmp_path, monkeypatch):
    df = cohort(tmp_path)
    out = tmp_path / "x"
    pred = StubPredictor(False)
    real_png, calls = E.overview_png, []

    def dying_png(image, sal, affine, path, title, **kw):
        calls.append(title)
        if title.startswith("case c3 "):  # killed while writing the fourth case: a temp PNG is left behind
            (path.parent / f".{path.name.split('.')[0]}.abc123.tmp.png").write_bytes(b"partial")
            raise KeyboardInterrupt
        real_png(image, sal, affine, path, title, **kw)

    monkeypatch.setattr(E, "overview_png", dying_png)
    with pytest.raises(KeyboardInterrupt):
        E.explain_cases(pred, df, out, progress=False)
    assert (out / "c3_saliency.nii.gz").exists() and not (out / "c3_explain.json").exists()
    before = _mtimes(out, ["c0", "c1", "c2"])
    (out / "c1_attention.nii.gz").unlink()  # a user deletes one map of a finished case
    monkeypatch.setattr(E, "overview_png", real_png)
    made = []
    real_case = E.explain_case
    monkeypatch.setattr(E, "explain_case", lambda p, case, o: made.append(case["case_id"].iloc[0]) or real_case(p, case, o))
    E.explain_cases(pred, df, out, progress=False)
    assert made == ["c1", "c3", "c4"]
    after = _mtimes(out, ["c0", "c2"])
    assert all(after[k] == before[k] for k in after)
    assert not list(out.glob(".*")), list(out.glob(".*"))
    table = pd.read_csv(out / E.TABLE)
    assert sorted(table["case_id"].unique()) == [f"c{i}" for i in range(5)] and len(table) == 10
    assert table.loc[(table["case_id"] == "c2") & (table["feature"] == "crp"), ["observed", "attribution"]].iloc[0]\
        .tolist() == [0, 0.0]
    made.clear()
    E.explain_cases(pred, df, out, progress=False)  # everything done: nothing is remade
    assert made == []
    E.explain_cases(StubPredictor(False, model_id="m2"), df.iloc[:1], out, progress=False)
    assert made == ["c0"]  # another model's file set is not taken as done


def test_two_shards_into_one_folder(tmp_path):
    df = cohort(tmp_path, n=6)
    out = tmp_path / "x"
    for shard in (0, 1):
        E.explain_cases(StubPredictor(False), df.iloc[shard::2], out, progress=False)
    table = pd.read_csv(out / E.TABLE)
    assert sorted(table["case_id"].unique()) == [f"c{i}" for i in range(6)]
    for i in range(6):
        assert E.is_done(out, f"c{i}", "m1")


def test_case_ids_that_are_not_file_names_stay_inside_the_folder(tmp_path):
    files = E.case_files(tmp_path, "../p 1/x.y")
    assert all(p.parent == tmp_path for p in files.values())
    assert E.case_files(tmp_path, "../p 1/x.y") != E.case_files(tmp_path, "..-p-1-x-y")
    assert E.case_files(tmp_path, "abc_1")["saliency"].name == "abc_1_saliency.nii.gz"


def test_a_case_without_image_gets_attributions_only(tmp_path):
    df = cohort(tmp_path, n=1)
    df.loc[0, "image"] = np.nan
    out = tmp_path / "x"
    E.explain_cases(StubPredictor(True), df, out, progress=False)
    info = __import__("json").loads((out / "c0_explain.json").read_text())
    assert info["files"] == [] and [a["feature"] for a in info["attributions"]] == ["age", "crp"]
    assert not (out / "c0_saliency.nii.gz").exists() and E.is_done(out, "c0", "m1")


def test_windowed_attributions_encode_the_image_once(monkeypatch):
    p = StubPredictor(True)
    calls = []
    real = p.model.windows._tokens
    monkeypatch.setattr(p.model.windows, "_tokens", lambda *a: calls.append(1) or real(*a))
    image, present = torch.rand(1, 1, 24, 24, 16), torch.ones(1)
    values, mask = torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    fast = E.clinical_attributions(p.model, "binary", image, present, values, mask)
    assert len(calls) == 1 and p.model.windows.reuse is None
    with torch.no_grad():  # the reference, one full pass per feature
        base = p.model(image, present, values, mask)[:, 0]
        ref = torch.stack([base - p.model(image, present, values, mask * torch.tensor([[0.0, 1.0]]))[:, 0],
                           base - p.model(image, present, values, mask * torch.tensor([[1.0, 0.0]]))[:, 0]], 1)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=0)


def test_overview_shows_the_prediction_and_the_attention_map(tmp_path, monkeypatch):
    """The overview's title carries the model and its probability; a cross-attention model's
    attention map is drawn as a second row (mmai.figures.overlay)."""
    seen = {}
    real = E.write_overlay_png

    def spy(path, image, affine, layers, **kw):
        seen.update(layers=[lyr.name for lyr in layers], title=kw["title"], shape=image.shape, window=kw.get("window"))
        return real(path, image, affine, layers, **kw)

    monkeypatch.setattr(E, "write_overlay_png", spy)
    df = cohort(tmp_path, n=1).assign(label="1")
    E.explain_cases(StubPredictor(False), df, tmp_path / "x", progress=False)
    assert seen["layers"] == ["saliency", "attention"] and seen["shape"] == NATIVE_SHAPE
    assert seen["window"] == (-1000.0, 1000.0)  # raw HU input: the pipeline's CT window, what the model saw
    assert re.fullmatch(r"case c0 \| model m1 \| P\(1\) = 0\.\d{3}, predicted [01] \| label 1", seen["title"])

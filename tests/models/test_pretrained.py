"""``model.pretrained``: every checkpoint format loads into the encoder (tensor for tensor), is
reported, and fails with a message naming the key / file when it cannot."""

import json
import pickle

import pytest
import torch
from monai.networks.nets import resnet10
from safetensors.torch import save_file

from mmai.config import config_from_dict
from mmai.errors import CheckpointError, ConfigError
from mmai.models.image_encoders import create_encoder
from mmai.models.pretrained import (
    apply_pretrained,
    best_rewrite,
    frozen_for,
    load_into,
    param_groups,
    read_checkpoint,
)
from mmai.models.registry import create_model

W = (8, 16, 32, 64)


def _randomised(encoder: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """A state dict of the encoder's shapes with random values (buffers included)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
            for k, v in encoder.state_dict().items()}


def _assert_arrived(encoder: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = encoder.state_dict()
    differ = [k for k, v in expected.items() if not torch.equal(own[k], v)]
    assert not differ, f"{len(differ)} tensors did not arrive, e.g. {differ[:3]}"


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "net", "nested"])
@pytest.mark.parametrize("module_prefix", [False, True])
def test_plain_state_dict_file_loads_all_wrappings(tmp_path, wrap, module_prefix):
    src = create_encoder("resnet", widths=W)
    sd = _randomised(src)
    keys = {("module." + k if module_prefix else k): v for k, v in sd.items()}
    obj = {"raw": keys, "state_dict": {"state_dict": keys, "epoch": 3}, "model": {"model": keys, "opt": {}},
           "net": {"net": keys}, "nested": {"model": {"state_dict": keys}}}[wrap]
    torch.save(obj, tmp_path / "w.pt")
    dst = create_encoder("resnet", widths=W)
    tensors, fmt, _ = read_checkpoint(tmp_path / "w.pt")
    report = load_into(dst, tensors, source="w.pt", fmt=fmt)
    _assert_arrived(dst, sd)
    assert fmt == "state_dict" and len(report.matched) == len(sd) and not report.missing and not report.unexpected


def test_safetensors_with_another_prefix_is_rewritten_onto_the_encoder(tmp_path):
    model = create_model("image_only", n_outputs=1, widths=W)  # keys image.encoder.net.conv1.weight, ...
    sd = {k: torch.randn(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    dst = create_encoder("resnet", widths=W)
    tensors, fmt, _ = read_checkpoint(tmp_path / "model.safetensors")
    report = load_into(dst, tensors, source="m", fmt=fmt)
    assert fmt == "safetensors" and report.rewrite == ("image.encoder.", "")
    _assert_arrived(dst, {k[len("image.encoder."):]: v for k, v in sd.items() if k.startswith("image.encoder.")})
    assert report.unexpected and all(not k.startswith("image.encoder.") for k in report.unexpected)
    # only num_batches_tracked buffers (not floating point, not saved above) are missing
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)


@pytest.mark.parametrize(("depth", "widths"), [(10, (64, 128, 256, 512)), (18, W), (50, W)])
def test_medicalnet_checkpoint_of_a_monai_resnet_loads_onto_resnetN(tmp_path, depth, widths):
    """A MONAI ResNet saved the MedicalNet way: {'state_dict': {'module.conv1.weight', ...}}, plus the
    segmentation head conv_seg, with MedicalNet's shortcut type per depth (resnet10: MONAI's own
    MedicalNet constructor at the published widths)."""
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args, resnet_params

    bias, shortcut = get_medicalnet_pretrained_resnet_args(depth)
    if depth == 10:
        net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type=shortcut,
                       bias_downsample=bias)
    else:
        block, layers = resnet_params[f"resnet{depth}"][:2]
        net = ResNet(block, layers, list(widths), spatial_dims=3, n_input_channels=1, conv1_t_stride=2,
                     feed_forward=False, shortcut_type=shortcut, bias_downsample=bias)
    W = widths  # noqa: N806
    g = torch.Generator().manual_seed(depth)
    sd = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    ckpt = {"epoch": 200, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    ckpt["state_dict"]["module.conv_seg.0.weight"] = torch.randn(2, 8, 3, 3, 3)
    torch.save(ckpt, tmp_path / f"resnet_{depth}.pth")
    enc = create_encoder(f"resnet{depth}", widths=W)
    tensors, fmt, _ = read_checkpoint(tmp_path / f"resnet_{depth}.pth")
    report = load_into(enc, tensors, source="medicalnet", fmt=fmt)
    assert fmt == "medicalnet" and report.rewrite == ("", "net.")
    _assert_arrived(enc, {f"net.{k}": v for k, v in sd.items()})
    assert report.missing == [] and report.unexpected == ["conv_seg.0.weight"]
    assert tuple(enc.net.conv1.weight.shape[2:]) == (7, 7, 7)


def test_monai_bundle_folder_reads_models_model_pt_only(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    # a config that would run code if instantiated: it must never be
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": {"_target_": "os.system",
                                                                                   "command": "touch HACKED"}}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "toy", "version": "0.1"}))
    enc = create_encoder("resnet", widths=W)
    sd = _randomised(enc, 5)
    torch.save({f"encoder.{k}": v for k, v in sd.items()}, bundle / "models" / "model.pt")
    cfg = config_from_dict({"model": {"fusion": "image_only", "widths": list(W), "pretrained": str(bundle)}})
    model = create_model("image_only", n_outputs=1, widths=W)
    report = apply_pretrained(model, cfg)
    _assert_arrived(model.image.encoder, sd)
    assert report["format"] == "monai_bundle" and report["n_matched"] == len(sd) and report["n_missing"] == 0
    assert not (tmp_path / "HACKED").exists()


def test_bundle_with_torchscript_only_and_pickled_code_are_refused(tmp_path):
    bundle = tmp_path / "b"
    (bundle / "models").mkdir(parents=True)
    (bundle / "models" / "model.ts").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="TorchScript.*model.pt"):
        read_checkpoint(bundle)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(CheckpointError, match=r"evil.pt.*weights_only=True"):
        read_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="mmai pretrain.*MONAI bundle"):
        read_checkpoint(tmp_path / "empty")


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    src = create_encoder("resnet", widths=(8, 16, 32, 32))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    tensors, fmt, _ = read_checkpoint(tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"'net.layer4.0.conv1.weight' has shape \(32, 32, 3, 3, 3\).*"
                                              r"\(64, 32, 3, 3, 3\)"):
        load_into(create_encoder("resnet", widths=W), tensors, source="w.pt", fmt=fmt)
    with pytest.raises(CheckpointError, match="no tensor of the checkpoint matches"):
        load_into(create_encoder("resnet", widths=W), {"foo.bar": torch.zeros(2)}, source="x", fmt="state_dict")


def test_one_channel_checkpoint_feeds_a_three_channel_pipeline():
    src = create_encoder("resnet", in_channels=1, widths=W)
    sd = _randomised(src, 7)
    dst = create_encoder("resnet", in_channels=3, widths=W)
    report = load_into(dst, sd, source="s", fmt="state_dict", image_channels=3)
    w = dst.state_dict()["net.conv1.weight"]
    assert torch.allclose(w, sd["net.conv1.weight"].repeat(1, 3, 1, 1, 1) / 3)
    assert "in_channels 1 -> 3" in report.adapted["net.conv1.weight"]
    # the same volume in each of 3 channels gives the 1-channel network's stem response
    x = torch.randn(1, 1, 16, 16, 16)
    one = torch.nn.functional.conv3d(x, sd["net.conv1.weight"], stride=2, padding=1)
    assert torch.allclose(dst.net.conv1(x.repeat(1, 3, 1, 1, 1)), one, atol=1e-5)
    two = create_encoder("resnet", in_channels=2, widths=W).state_dict()
    with pytest.raises(CheckpointError, match="2 input channels, the pipeline gives 3"):
        load_into(create_encoder("resnet", in_channels=3, widths=W), two, source="s", fmt="state_dict",
                  image_channels=3)


def test_best_rewrite_prefers_the_rewrite_matching_most_keys():
    enc = ["net.conv1.weight", "net.layer1.0.conv1.weight", "net.layer1.0.bn1.weight"]
    ck = ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "backbone.layer1.0.bn1.weight", "head.w"]
    assert best_rewrite(ck, enc) == ("backbone.", "net.")


def test_lr_groups_and_freezing(tmp_path):
    enc = create_encoder("resnet", widths=W)
    torch.save(enc.state_dict(), tmp_path / "w.pt")
    for freeze, lr_mult in ((False, 0.1), (True, 1.0)):
        cfg = config_from_dict({"model": {"fusion": "image_only", "widths": list(W), "pretrained": str(tmp_path / "w.pt"),
                                          "pretrained_lr": lr_mult, "freeze_pretrained": freeze}})
        model = create_model("image_only", n_outputs=1, widths=W)
        report = apply_pretrained(model, cfg)
        groups = param_groups(model, 1e-3, cfg.model.pretrained_lr)
        n_enc = sum(1 for _ in model.image.encoder.parameters())
        if freeze:
            assert len(groups) == 1 and not any(p.requires_grad for p in model.image.encoder.parameters())
        else:
            assert [g["name"] for g in groups] == ["default", "pretrained"]
            assert len(groups[1]["params"]) == n_enc and groups[1]["lr"] == pytest.approx(1e-4)
        assert report["lr_multiplier"] == lr_mult and report["frozen"] is freeze
    f = frozen_for(2, 5, lambda s: 1.0)
    assert [f(s) for s in (0, 9, 10)] == [0.0, 0.0, 1.0]


def test_config_ranges():
    with pytest.raises(ConfigError, match="pretrained_lr must be > 0"):
        config_from_dict({"model": {"pretrained_lr": 0}})
    with pytest.raises(ConfigError, match="freeze_pretrained"):
        config_from_dict({"model": {"freeze_pretrained": -1}})
    assert config_from_dict({"model": {"freeze_pretrained": 3}}).model.freeze_pretrained == 3
    with pytest.raises(ConfigError, match="pretrain.mask_fraction"):
        config_from_dict({"pretrain": {"mask_fraction": 1.5}})


def test_partial_load_reports_matched_missing_unexpected_and_logs_them(tmp_path, caplog):
    """A checkpoint holding only part of the encoder plus foreign tensors: the matched tensors
    arrive, the rest stays at initialisation, and the report (what metrics.json gets) and the run
    log name the counts and the keys."""
    src = create_encoder("resnet", widths=W)
    sd = _randomised(src, 11)
    keep = {k: v for k, v in sd.items() if not k.startswith("net.layer4.")}
    dropped = sorted(set(sd) - set(keep))
    extra = {"head.weight": torch.randn(3, 64), "decoder.up.0.weight": torch.randn(4, 4, 3, 3, 3)}
    torch.save({"state_dict": {f"module.encoder.{k}": v for k, v in keep.items()}
                | {f"module.{k}": v for k, v in extra.items()}}, tmp_path / "part.pth")
    cfg = config_from_dict({"model": {"fusion": "image_only", "widths": list(W), "pretrained": str(tmp_path / "part.pth")}})
    model = create_model("image_only", n_outputs=1, widths=W)
    before = {k: v.clone() for k, v in model.image.encoder.state_dict().items()}
    with caplog.at_level("INFO", logger="mmai.models.pretrained"):
        report = apply_pretrained(model, cfg)
    _assert_arrived(model.image.encoder, keep)
    own = model.image.encoder.state_dict()
    assert all(torch.equal(own[k], before[k]) for k in dropped)  # kept at initialisation
    assert report["n_matched"] == len(keep) and report["n_missing"] == len(dropped)
    assert report["n_unexpected"] == len(extra) and sorted(report["unexpected"]) == sorted(extra)
    assert sorted(report["missing"]) == dropped and report["format"] == "state_dict"
    assert report["rewrite"] == {"checkpoint_prefix": "encoder.", "encoder_prefix": ""}
    text = caplog.text
    assert f"{len(keep)} encoder tensors loaded, {len(dropped)} missing" in text and f"{len(extra)} unexpected" in text
    assert "net.layer4.0.conv1.weight" in text  # the missing keys are named in the log
    # the optimizer groups: only the tensors that arrived train at the pretrained learning rate
    marked = model.pretrained_params
    assert not any(".layer4." in n for n in marked) and any(".layer1." in n for n in marked)


def test_monai_bundle_with_safetensors_weights_and_mmai_pretrain_folder(tmp_path):
    """models/model.safetensors in a bundle; an `mmai pretrain` output folder (encoder.safetensors +
    pretrain.json) read without the pretraining run, with the pipeline recorded in its notes."""
    enc = create_encoder("resnet", widths=W)
    sd = {k: v for k, v in _randomised(enc, 13).items() if v.is_floating_point()}
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    save_file({f"backbone.{k}": v for k, v in sd.items()}, str(bundle / "models" / "model.safetensors"))
    tensors, fmt, meta = read_checkpoint(bundle)
    dst = create_encoder("resnet", widths=W)
    load_into(dst, tensors, source="b", fmt=fmt)
    _assert_arrived(dst, sd)
    assert fmt == "monai_bundle" and meta["weights"] == "models/model.safetensors"

    out = tmp_path / "pre"
    out.mkdir()
    save_file(sd, str(out / "encoder.safetensors"))
    (out / "pretrain.json").write_text(json.dumps({"format": "mmai-pretrain", "encoder": "resnet",
                                                   "widths": list(W), "pipeline_id": "another"}))
    cfg = config_from_dict({"model": {"fusion": "image_only", "widths": list(W), "pretrained": str(out)}})
    model = create_model("image_only", n_outputs=1, widths=W)
    report = apply_pretrained(model, cfg)
    _assert_arrived(model.image.encoder, sd)
    assert report["format"] == "mmai_pretrain" and report["n_matched"] == len(sd)
    assert any("pretrained on image pipeline another" in n for n in report["notes"])

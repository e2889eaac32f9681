"""Shared fixtures: a tiny real nnU-Net project, command runners, and checks used by several test modules.

The project is built once per test session in a temporary folder: the demo generator at 32x32 pixels,
nnU-Net's own planning and preprocessing, ``nnUNetTrainerOOD_smoke`` (fits OOD state at the end of
training) and nnU-Net's stock ``nnUNetTrainer_1epoch`` (for the post-hoc fit). Helpers are fixtures
(``run_command``, ``fails_with``, ``read_map``, ``predict_argv``, ``preprocessed_case``, ``shrink_plans``),
never imported from this module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
OOD_TRAINER = "nnUNetTrainerOOD_smoke"
STOCK_TRAINER = "nnUNetTrainer_1epoch"


@dataclass
class TinyProject:
    root: Path
    env: dict[str, str]
    dataset: object  # nnunet_ood.demo.synthetic.DemoDataset
    dataset_id: int = 501

    @property
    def results(self) -> Path:
        return self.root / "results" / self.dataset.name

    def model(self, trainer: str, configuration: str = "2d") -> Path:
        return self.results / f"{trainer}__nnUNetPlans__{configuration}"


def _run(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    executable = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([executable, *cmd[1:]], env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _shrink_plans(preprocessed: Path, dataset_name: str, configuration: str, patch_size: list[int],
                  features: list[int], strides: list[list[int]]) -> None:
    """Replace a planned configuration's network by a tiny one (few stages and features, small patch).

    Preprocessed data does not depend on the network or patch size, so this is safe after preprocessing.
    A patch smaller than the images gives several sliding-window patches per case: more training patches
    than bottleneck features, as with real datasets.
    """
    plans_file = preprocessed / dataset_name / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][configuration]
    kwargs = config["architecture"]["arch_kwargs"]
    n = len(features)
    config["patch_size"] = patch_size
    kwargs.update(n_stages=n, features_per_stage=features, strides=strides,
                  kernel_sizes=[[3] * len(patch_size)] * n, n_conv_per_stage=[2] * n,
                  n_conv_per_stage_decoder=[2] * (n - 1))
    plans_file.write_text(json.dumps(plans, indent=2))


def _nnunet_env(root: Path) -> dict[str, str]:
    from nnunet_ood.ext_trainer import trainer_dir

    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_compile="0", nnUNet_def_n_proc="1",
               nnUNet_n_proc_DA="0", nnUNet_extTrainer=trainer_dir(), OMP_NUM_THREADS="2",
               PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="session")
def tiny_unet() -> Callable:
    """``tiny_unet(ndim, seed=0, residual=False)``: a small PlainConvUNet (or ResidualEncoderUNet) as nnU-Net
    builds them, with random weights, in eval mode."""

    def build(ndim: int, seed: int = 0, residual: bool = False):
        import torch
        from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
        from torch import nn

        torch.manual_seed(seed)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d
        common = dict(norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                      nonlin_kwargs={"inplace": True})
        if residual:
            return ResidualEncoderUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], [1, 2, 2], 3, [1, 1], **common).eval()
        return PlainConvUNet(1, 3, [4, 8, 16], conv, 3, [1, 2, 2], 2, 3, [2, 2], **common).eval()

    return build


@pytest.fixture(scope="session")
def run_command() -> Callable[..., subprocess.CompletedProcess]:
    """Run an nnU-Net / plugin command line; fail the test with its output if it fails."""
    return _run


@pytest.fixture(scope="session")
def shrink_plans() -> Callable[..., None]:
    return _shrink_plans


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> TinyProject:
    from nnunet_ood.demo.synthetic import generate_demo_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = _nnunet_env(root)
    dataset = generate_demo_dataset(root / "raw", 501, seed=0, n_train=24, n_test_per_domain=3, size=32)
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # planning sets threads from it
    _run(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "2d", "-np", "1"], plan_env)
    # 16x16 patches on 32x32 images: 9 patches per case; bottleneck 16 x 4 x 4 = 256 features. A 2x2
    # bottleneck is instance-normalised over 4 values per channel and tells too little about the input.
    _shrink_plans(root / "preprocessed", dataset.name, "2d", [16, 16], [8, 16, 16], [[1, 1], [2, 2], [2, 2]])
    _run(["nnUNetv2_train", "501", "2d", "0", "-tr", OOD_TRAINER, "-device", "cpu"], env)
    _run(["nnUNetv2_train", "501", "2d", "0", "-tr", STOCK_TRAINER, "-device", "cpu"], env)
    old = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet")})
    yield TinyProject(root, env, dataset)
    os.environ.clear()
    os.environ.update(old)


@pytest.fixture(scope="session")
def fit_context(tiny_project):
    """A FitContext of fold 0 of the stock model (only mahalanobis), as fit_fold builds it."""
    from nnunet_ood.fitting.options import FitOptions
    from nnunet_ood.fitting.pipeline import _fit_context

    def make(**options):
        return _fit_context(str(tiny_project.model("nnUNetTrainer_1epoch")), 0,
                            FitOptions(**{"methods": ("mahalanobis",), "progress": False, **options}))

    return make


@pytest.fixture()
def test_images(tiny_project, tmp_path) -> Path:
    """All test domains' images in one input folder (a fresh copy per test)."""
    folder = tmp_path / "input"
    folder.mkdir()
    for domain in tiny_project.dataset.domains:
        for f in Path(tiny_project.dataset.images_ts[domain]).iterdir():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture()
def fails_with(capsys) -> Callable[..., str]:
    """``fails_with(main, argv, *needles)``: run a CLI main; assert exit status 2 and one ``error: ...`` line
    containing every needle; returns that line."""

    def check(main, argv: list[str], *needles: str) -> str:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        for needle in needles:
            assert needle in err[0], err[0]
        return err[0]

    return check


@pytest.fixture(scope="session")
def predict_argv(tiny_project) -> Callable[..., list[str]]:
    """``predict_argv(inp, out, trainer=OOD_TRAINER, *extra)``: arguments of nnUNetv2_predict_ood for fold 0."""

    def argv(inp: Path, out: Path, trainer: str = OOD_TRAINER, *extra: str) -> list[str]:
        return ["-i", str(inp), "-o", str(out), "-d", str(tiny_project.dataset_id), "-c", "2d", "-f", "0",
                "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar", *extra]

    return argv


@pytest.fixture(scope="session")
def read_map() -> Callable:
    """``read_map(image_file, map_file)``: read an OOD map; assert it is float32 with the size, spacing, origin
    and direction of its input."""
    import SimpleITK as sitk

    def read(image_file: Path, map_file: Path):
        image, ood_map = sitk.ReadImage(str(image_file)), sitk.ReadImage(str(map_file))
        assert ood_map.GetSize() == image.GetSize()
        assert ood_map.GetSpacing() == pytest.approx(image.GetSpacing())
        assert ood_map.GetOrigin() == pytest.approx(image.GetOrigin())
        assert ood_map.GetDirection() == pytest.approx(image.GetDirection())
        assert ood_map.GetPixelID() == sitk.sitkFloat32
        return sitk.GetArrayFromImage(ood_map)

    return read


@pytest.fixture(scope="session")
def preprocessed_case(tiny_project) -> Callable:
    """``preprocessed_case(methods, domain, trainer=OOD_TRAINER)``: an nnUNetOODPredictor for fold 0 with
    ``methods`` and a test case of ``domain`` preprocessed by nnU-Net's own preprocessor (a tensor)."""

    def make(methods: list[str] | None, domain: str, trainer: str = OOD_TRAINER):
        import torch

        from nnunet_ood.inference.predictor import nnUNetOODPredictor

        predictor = nnUNetOODPredictor(device=torch.device("cpu"), allow_tqdm=False, ood_methods=methods)
        predictor.initialize_from_trained_model_folder(str(tiny_project.model(trainer)), [0])
        image = sorted((tiny_project.root / "raw").glob(f"*/imagesTs_{domain}/*_0000.nii.gz"))[0]
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        data, _, _ = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                           predictor.configuration_manager, predictor.dataset_json)
        return predictor, torch.from_numpy(data)

    return make

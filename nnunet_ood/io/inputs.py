"""Checks of a prediction's input and output folders, before the model is loaded (no torch, no nnU-Net).

Every problem is a one-line :class:`~nnunet_ood.errors.OODInputError` naming the case or folder and the
fix, raised before anything is written:

* the input folder: a folder (not a file), cases named ``CASE_XXXX<ending>``, the model's number of
  channels, every entry a file (no dangling symbolic link, no link loop);
* every image header: readable as an image, one scalar value per voxel (no RGB/vector pixel type), a
  dimension the reader reads as one channel (no 4D file with extra channels), a direction nnU-Net's readers
  accept, a spacing that nnU-Net's resampling to the model's spacing does not shrink to zero voxels, and, at the
  model's spacing, at least one bottleneck voxel of the network (a 1 x 1 image is refused; a larger image
  smaller than the patch is padded by nnU-Net, as always);
* every checkpoint: a complete PyTorch file (not truncated, not some other file);
* the output folder: not a file, not the input folder, writable;
* map files that would overwrite another case's outputs (``foo`` and ``foo_ood_mahalanobis``).

The command lines run them before loading the model; ``nnUNetOODPredictor.check_input_files`` runs the input
checks for callers of the Python API (a folder or nnU-Net's list of lists, :func:`input_lists`).
"""

from __future__ import annotations

import errno
import math
import os
import re
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from nnunet_ood.errors import OODInputError

#: file endings whose headers SimpleITK reads (the others are left to nnU-Net's own readers)
HEADER_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".gipl.gz")


def check_input_entry(path: str) -> None:
    """An input image entry must be a readable file: not a dangling symbolic link, a link loop or a folder."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            what = "a symbolic link loop"
        elif os.path.islink(path):
            what = f"a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        else:
            what = f"unreadable ({e.strerror})"
        raise OODInputError(f"input entry {path} is {what}; fix or remove it") from None
    if not os.path.isfile(path):
        raise OODInputError(f"input entry {path} is not a file; remove it or rename it so that it does not end in "
                            "the dataset's file ending")


def input_cases(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """``{case: [channel files]}`` of an nnU-Net input folder; one-line errors for empty folders, wrong channels
    and entries that are no files."""
    if os.path.isfile(folder):
        raise OODInputError(f"-i {folder} is a file, not a folder; give the folder that holds the images "
                            "(CASE_XXXX<ending>)")
    if not os.path.isdir(folder):
        raise OODInputError(f"input folder {folder} does not exist")
    pattern = re.compile(r"^(.*)_(\d{4})" + re.escape(file_ending) + "$")
    names = [f for f in sorted(os.listdir(folder)) if f.endswith(file_ending)]
    for name in names:
        check_input_entry(os.path.join(folder, name))
    if not names:
        raise OODInputError(f"no input images ending in {file_ending} in {folder}; nnU-Net expects "
                            f"CASE_0000{file_ending} (one file per channel)")
    unnamed = [f for f in names if pattern.match(f) is None]
    if unnamed:
        raise OODInputError(f"{len(unnamed)} file(s) in {folder} lack the _XXXX channel suffix nnU-Net needs, "
                            f"e.g. rename {unnamed[0]} to {unnamed[0][:-len(file_ending)]}_0000{file_ending}")
    files: dict[str, list[str]] = defaultdict(list)
    for name in names:
        files[pattern.match(name).group(1)].append(name)
    for case, channel_files in files.items():
        found = sorted(int(pattern.match(f).group(2)) for f in channel_files)
        if found != list(range(num_channels)):
            raise OODInputError(f"case {case} has channel files {found} but the model expects {num_channels} "
                                f"input channel(s) _0000.._{num_channels - 1:04d}; fix the input folder")
    return {case: [os.path.join(folder, f) for f in sorted(channel_files)] for case, channel_files in files.items()}


def input_lists(lists: Sequence[Sequence[str]], file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """``{case: [channel files]}`` of nnU-Net's list-of-lists input (one list of channel files per case, what the
    Python API takes instead of a folder): every entry a readable file, one file per channel of the model."""
    cases: dict[str, list[str]] = {}
    for files in lists:
        files = [files] if isinstance(files, str) else list(files)
        for path in files:
            check_input_entry(path)
        name = os.path.basename(files[0]) if files else "(an empty list)"
        case = name[:-len(file_ending) - 5] if name.endswith(file_ending) and len(name) > len(file_ending) + 5 \
            else name
        if len(files) != num_channels:
            raise OODInputError(f"case {case} is given {len(files)} file(s) but the model expects {num_channels} input "
                                "channel(s); give one file per channel")
        cases[case if case not in cases else files[0]] = files
    return cases


def _configuration_value(plans: Mapping[str, Any], configuration: str, key: str) -> Any:
    """``key`` of a configuration in the plans (following ``inherits_from``), or None."""
    configurations = plans.get("configurations", {})
    seen = set()
    while configuration in configurations and configuration not in seen:
        seen.add(configuration)
        config = configurations[configuration]
        if key in config:
            return config[key]
        configuration = config.get("inherits_from")
    return None


def configuration_spacing(plans: Mapping[str, Any], configuration: str) -> list[float] | None:
    """The target spacing of a configuration in the plans (following ``inherits_from``), or None."""
    spacing = _configuration_value(plans, configuration, "spacing")
    return None if spacing is None else [float(s) for s in spacing]


def bottleneck_voxels(plans: Mapping[str, Any], configuration: str) -> list[int] | None:
    """Voxels of the resampled image that one bottleneck voxel covers, per axis of the network: the product of the
    encoder's strides (``architecture.arch_kwargs.strides``; ``pool_op_kernel_sizes`` in plans of nnU-Net before
    2.4); None when the plans do not say."""
    architecture = _configuration_value(plans, configuration, "architecture")
    kwargs = architecture.get("arch_kwargs") if isinstance(architecture, dict) else None
    strides = kwargs.get("strides") if isinstance(kwargs, dict) else None
    strides = strides or _configuration_value(plans, configuration, "pool_op_kernel_sizes")
    patch = _configuration_value(plans, configuration, "patch_size")
    if not isinstance(strides, list) or not isinstance(patch, list):
        return None
    total = [1] * len(patch)
    for stage in strides:
        stage = stage if isinstance(stage, list) else [stage] * len(patch)  # an int strides every axis alike
        total = [t * int(s) for t, s in zip(total, stage)]
    return total


def check_step_size(step_size: float, plans: Mapping[str, Any], configuration: str) -> None:
    """The sliding window must move by at least one voxel: ``step_size`` x the smallest patch edge >= 1
    (``-step_size 1e-9`` asked nnU-Net for billions of windows)."""
    patch_size = _configuration_value(plans, configuration, "patch_size")
    if patch_size and step_size * min(patch_size) < 1:
        raise OODInputError(f"-step_size {step_size:g} moves the sliding window by less than one voxel (patch size "
                            f"{' x '.join(map(str, patch_size))}); use at least {1 / min(patch_size):.3g} (default "
                            "0.5)")


def resampled_shape(size_xyz: Sequence[int], spacing_xyz: Sequence[float], target_spacing: Sequence[float],
                    transpose_forward: Sequence[int]) -> list[int]:
    """The array shape nnU-Net resamples an image to (before cropping), as its readers and preprocessor do.

    SimpleITK sizes and spacings are (x, y, z); nnU-Net's arrays (z, y, x), with a 2D image as one slice of
    spacing 999. A 2D configuration keeps the first (slice) axis and resamples the other two.
    """
    shape, spacing = list(size_xyz)[::-1], list(spacing_xyz)[::-1]
    if len(shape) == 2:
        shape, spacing = [1, *shape], [999.0, *spacing]
    shape = [shape[i] for i in transpose_forward]
    spacing = [spacing[i] for i in transpose_forward]
    target = list(target_spacing) if len(target_spacing) == len(shape) else [spacing[0], *target_spacing]
    return [int(round(sp / t * s)) for s, sp, t in zip(shape, spacing, target)]


class ImageHeader(NamedTuple):
    """What a header tells of an image: size and spacing (x, y, z, ...), values per voxel, pixel type."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    components: int = 1  # 3 for RGB, n for a vector image
    pixel: str = ""


def _sitk_header(path: str) -> ImageHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ValueError(" ".join(str(e).split()).split("ERROR: ")[-1][:200]) from None
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    return ImageHeader(reader.GetSize(), reader.GetSpacing(), reader.GetNumberOfComponents(), pixel)


def _nibabel_header(path: str) -> ImageHeader:
    import nibabel

    try:
        header = nibabel.load(path).header  # reads the header only
    except Exception as e:  # nibabel raises several types for files that are not images
        raise ValueError(" ".join(str(e).split())[:200]) from None
    dtype = header.get_data_dtype()
    return ImageHeader(tuple(int(s) for s in header.get_data_shape()), tuple(float(z) for z in header.get_zooms()),
                       len(dtype.fields) if dtype.fields else 1, str(dtype))


#: header readers by nnU-Net reader/writer class (the plans' ``image_reader_writer``); others are not checked
HEADER_READERS = {"SimpleITKIO": _sitk_header, "SimpleITKIOWithReorient": _sitk_header,
                  "NibabelIO": _nibabel_header, "NibabelIOWithReorient": _nibabel_header}
#: image dimensions each reader reads (SimpleITK reads the 4th axis of a 4D file as channels)
READER_DIMENSIONS = {_sitk_header: (2, 3, 4), _nibabel_header: (3,)}


def check_image_layout(path: str, case: str, header: ImageHeader, dimensions: Sequence[int],
                       num_channels: int) -> None:
    """One scalar value per voxel, a dimension the reader reads, and exactly one channel per file (the files
    ``_0000.._XXXX`` are the channels): an RGB/vector pixel type or a 4D file with extra channels is refused."""
    if header.components != 1:
        raise OODInputError(f"input file {path} of case {case} has {header.components} values per voxel (pixel type "
                            f"{header.pixel}) but the model reads one per voxel and channel; convert it to a "
                            "single-component (grey-value) image, one file per channel")
    size = tuple(header.size)
    if len(size) in dimensions and (len(size) < 4 or size[3] == 1):
        return
    shown = " or ".join(f"{d}D" for d in dimensions if d < 4)
    raise OODInputError(f"input file {path} of case {case} is a {len(size)}D image of size {size} but the model "
                        f"reads {shown} images, one channel per file ({num_channels} channel(s): "
                        f"_0000.._{num_channels - 1:04d}); split it into one image per channel")


def check_image_headers(cases: Mapping[str, Sequence[str]], reader: str | None,
                        target_spacing: Sequence[float] | None, transpose_forward: Sequence[int],
                        num_channels: int = 1, bottleneck: Sequence[int] | None = None) -> None:
    """Read every image's header with (the header part of) the model's reader: it must be an image that
    nnU-Net can read and resample, with one scalar channel per file. ``reader``: the plans'
    ``image_reader_writer`` (None: SimpleITK). ``bottleneck``: the voxels one bottleneck voxel covers per axis of
    the network (:func:`bottleneck_voxels`); an image that fits inside one of them at the model's spacing is
    refused (:func:`check_image_size`)."""
    read_header = HEADER_READERS.get(reader or "SimpleITKIO")
    for case, files in cases.items():
        for path in files:
            if os.path.getsize(path) == 0:
                raise OODInputError(f"input file {path} of case {case} is empty; replace or remove the case")
            if read_header is None or not path.endswith(HEADER_ENDINGS):
                continue
            try:
                header = read_header(path)
            except ValueError as e:
                raise OODInputError(f"cannot read input file {path} of case {case} as an image ({e}); "
                                    "replace or remove the case") from None
            check_image_layout(path, case, header, READER_DIMENSIONS[read_header], num_channels)
            size, spacing = header.size, header.spacing
            if not all(math.isfinite(s) and s > 0 for s in spacing):
                raise OODInputError(f"input file {path} of case {case} has spacing {spacing}; spacings must be "
                                    "positive: fix the image header")
            if target_spacing is not None and len(size) in (2, 3) and len(spacing) == len(size):
                shape = resampled_shape(size, spacing, target_spacing, transpose_forward)
                if min(shape) < 1:
                    raise OODInputError(f"case {case}: spacing {tuple(round(s, 6) for s in spacing)} and size "
                                        f"{tuple(size)} resample to {shape} voxels at the model's spacing "
                                        f"{tuple(target_spacing)}; fix the image header's spacing")
                check_image_size(path, case, tuple(size), shape, bottleneck)


def check_image_size(path: str, case: str, size: Sequence[int], shape: Sequence[int],
                     bottleneck: Sequence[int] | None) -> None:
    """An image that, resampled to the model's spacing (``shape``, nnU-Net's axis order), lies inside one bottleneck
    voxel along every axis the network downsamples is refused: nnU-Net pads it to a patch, the segmentation is
    of the padding and every OOD score describes the padding (a 1 x 1 image was predicted as background, flagged
    by the feature methods and *accepted* by quality). Such an image is a mistake (a thumbnail, a one-voxel mask,
    a header's size or spacing wrong). Larger images smaller than the patch are padded and predicted as usual."""
    if not bottleneck:
        return
    pairs = [(s, b) for s, b in zip(list(shape)[-len(bottleneck):], bottleneck) if b > 1]
    if pairs and all(s < b for s, b in pairs):
        raise OODInputError(f"input file {path} of case {case} is {' x '.join(map(str, size))} voxels, "
                            f"{' x '.join(map(str, list(shape)[-len(bottleneck):]))} at the model's spacing: less "
                            f"than one bottleneck voxel of the network ({' x '.join(map(str, bottleneck))}), so "
                            "nnU-Net would segment and score padding; check that it is the right image and its "
                            "header's size and spacing")


def check_images_for_model(cases: Mapping[str, Sequence[str]], plans: Mapping[str, Any], configuration: str,
                           num_channels: int) -> None:
    """:func:`check_image_headers` with what the model's plans say of its reader, spacing, axes and network."""
    check_image_headers(cases, plans.get("image_reader_writer"), configuration_spacing(plans, configuration),
                        plans.get("transpose_forward", [0, 1, 2]), num_channels,
                        bottleneck_voxels(plans, configuration))


def check_reference_sizes(pairs: Mapping[str, tuple[str, str]], reader: str | None) -> None:
    """Each case's reference segmentation must have its image's size (``pairs``: case -> (image file of its first
    channel, reference file); headers only, read as :func:`check_image_headers` reads them), so that a Dice against
    the wrong reference fails before anything is predicted rather than after every case."""
    read_header = HEADER_READERS.get(reader or "SimpleITKIO")
    for case, (image, reference) in pairs.items():
        if read_header is None or not (image.endswith(HEADER_ENDINGS) and reference.endswith(HEADER_ENDINGS)):
            continue
        try:
            image_size, reference_size = read_header(image).size, read_header(reference).size
        except ValueError as e:
            raise OODInputError(f"cannot read the header of case {case}'s image or reference ({e}); replace "
                                f"{reference}") from None
        if tuple(image_size) != tuple(reference_size):
            raise OODInputError(f"reference segmentation {reference} has size {tuple(reference_size)} but the image "
                                f"{image} of case {case} has size {tuple(image_size)}; give the reference of this "
                                "image")


def check_output_folder(output: str, input_folder: str | None = None) -> None:
    """The output folder must not be a file, a dangling symlink nor the input folder, and must be creatable and
    writable."""
    if os.path.islink(output) and not os.path.exists(output):
        raise OODInputError(f"output folder {output} is a symlink to {os.readlink(output)}, which does not exist; "
                            "create that folder or choose another -o")
    if os.path.exists(output) and not os.path.isdir(output):
        raise OODInputError(f"output folder {output} exists and is not a folder; choose another -o")
    if input_folder is not None and os.path.realpath(output) == os.path.realpath(input_folder):
        raise OODInputError(f"output folder {output} is the input folder; write predictions to another -o "
                            "(nnU-Net would mix its outputs with the inputs)")
    ancestor = os.path.abspath(output)
    while not os.path.isdir(ancestor):
        if os.path.exists(ancestor):
            raise OODInputError(f"output folder {output} cannot be created: {ancestor} is not a folder; choose "
                                "another -o")
        ancestor = os.path.dirname(ancestor)
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise OODInputError(f"cannot write to {ancestor} ({e.strerror}); choose a writable -o") from None


def map_collisions(cases: Iterable[str], methods: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs ``(case, other case)`` where the other case is named like one of ``case``'s map files."""
    names = set(cases)
    return [(case, f"{case}_ood_{m}") for case in sorted(names) for m in methods if f"{case}_ood_{m}" in names]


def check_map_collisions(cases: Iterable[str], methods: Iterable[str]) -> None:
    """One-line error when a map file ``<case>_ood_<method>`` would overwrite another case's outputs."""
    clashes = map_collisions(cases, methods)
    if clashes:
        case, other = clashes[0]
        raise OODInputError(f"the OOD map files of case {case} ({other}<ending>) would overwrite the outputs of "
                            f"case {other}; rename case {other} or predict without --save_ood_maps")


#: the first bytes of PyTorch's legacy (pre-zip) checkpoint format: a pickled magic number
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8"


def check_checkpoint(path: str) -> None:
    """A checkpoint file must exist and be a complete PyTorch file: a zip archive whose central directory is
    intact and that holds a ``data.pkl`` (what ``torch.save`` writes), or the legacy pickle format. Reads the
    archive's directory only, no tensors."""
    if not os.path.isfile(path):
        raise OODInputError(f"checkpoint {path} does not exist; choose another -chk or folds with -f")
    try:
        with zipfile.ZipFile(path) as archive:
            complete = any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            complete = f.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC
    except OSError as e:
        raise OODInputError(f"cannot read checkpoint {path} ({e.strerror}); check -chk") from None
    if not complete:
        raise OODInputError(f"checkpoint {path} is truncated or not a PyTorch checkpoint; copy it again or choose "
                            "another -chk")


def count_channels(dataset_json: Mapping[str, Any]) -> int:
    """Input channels of a model from its ``dataset.json``."""
    return len(dataset_json.get("channel_names", dataset_json.get("modality", {})))



"""Benchmark: size, write time and read-back error of one map per ``--ood_maps_dtype``.

A smooth synthetic 3D map (a Gaussian blob plus a slow sine pattern, like the spread patch distances of an
OOD map) written through nnU-Net's SimpleITK writer as .nii.gz, read back with SimpleITK. The error is
compared with the documented bound: int16 (max - min) / 131068 of the map plus float32 rounding, uint8 1/510
of the normalised map (bounds -1 and 6 here).

Usage::

    python benchmarks/bench_map_dtypes.py [--shape 256 256 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_description  # noqa: E402


def main() -> None:
    """Print one row per data type: file size, share of float32, write time, largest error and its bound."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_ood.io.maps import write_map_image
    from nnunet_ood.normalization import normalize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128), help="x y z voxels")
    args = parser.parse_args()
    low, high = -1.0, 6.0
    with tempfile.TemporaryDirectory() as work:
        image = sitk.Image(*args.shape, sitk.sitkFloat32)
        image.SetSpacing((0.8, 0.8, 2.0))
        source = os.path.join(work, "case_0000.nii.gz")
        sitk.WriteImage(image, source)
        data, properties = SimpleITKIO().read_images([source])
        z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in data.shape[1:]), indexing="ij")
        smooth = (5 * np.exp(-4 * (x**2 + y**2 + z**2)) + np.sin(3 * x) * np.cos(2 * y)).astype(np.float32)
        half_step = float(smooth.max() - smooth.min()) / 131068 + float(np.spacing(np.abs(smooth).max()))  # + float32
        references = {"float32": (smooth, 0.0), "int16": (smooth, half_step),
                      "uint8": (normalize(smooth, low, high), 1 / 510)}
        print(machine_description())
        print(f"map {' x '.join(map(str, args.shape))} voxels, .nii.gz")
        print(f"{'dtype':8} {'MB':>8} {'of f32':>7} {'write s':>8} {'max error':>10} {'bound':>10}")
        float32_size = None
        for dtype, (reference, bound) in references.items():
            path = os.path.join(work, f"case_ood_{dtype}.nii.gz")
            start = time.perf_counter()
            write_map_image(smooth, path, properties, SimpleITKIO, dtype, (low, high))
            seconds = time.perf_counter() - start
            size = os.path.getsize(path)
            float32_size = float32_size or size
            error = float(np.abs(sitk.GetArrayFromImage(sitk.ReadImage(path)) - reference).max())
            print(f"{dtype:8} {size / 1e6:8.2f} {size / float32_size:7.2f} {seconds:8.2f} {error:10.2e} "
                  f"{bound:10.2e}")


if __name__ == "__main__":
    main()

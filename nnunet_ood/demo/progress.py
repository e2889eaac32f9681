"""Live progress of a child command in this terminal, read from the output it writes to its log.

The demo runs every step as the real nnU-Net / plugin command line with its output going to a log file.
:func:`run_logged` tees that output: every byte goes to the log, and :class:`ProgressRelay` turns the lines it
recognises into tqdm bars here:

* nnU-Net's training epochs (``Epoch N``, ``Pseudo dice [...]``, ``Epoch time``): one bar over the epochs,
  with the last pseudo Dice per label and tqdm's ETA;
* any tqdm bar of the child (a shared model's training epochs, the fit's passes, ...), re-drawn with its own
  description, count and postfix (the child's bar is written with carriage returns into a pipe);
* ``nnUNetv2_predict_ood``'s line per scored case (``OOD CASE: ...``): one bar over the cases of a run.

Everything else stays in the log only, so the terminal shows one bar per phase.
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

_EPOCH = re.compile(r"(?:^|: )Epoch (\d+)\s*$")
_EPOCH_DONE = re.compile(r"(?:^|: )Epoch time: ")
_PSEUDO_DICE = re.compile(r"Pseudo dice \[(.*)\]")
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?=\)|,|$)")
# "desc:  42%|####      | 5/12 [00:03<00:05,  1.2it/s, loss=3.1]" as tqdm writes it
_CHILD_BAR = re.compile(r"^(?:(?P<desc>.*?):\s+)?\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<stats>[^\]]*)\]")
_SCORED = re.compile(r"^OOD (\S+): (?:flagged by |no flag)")  # nnUNetv2_predict_ood, once per case


class ProgressRelay:
    """Turns lines of a child's output into bars: at most one open bar, closed (and kept) when the next begins.

    ``epochs``: nnU-Net's number of training epochs (for the training bar); ``cases``: cases the child predicts;
    ``file``: where bars are drawn (default: standard error, as tqdm).
    """

    def __init__(self, epochs: int | None = None, cases: int | None = None, enabled: bool = True,
                 file: TextIO | None = None) -> None:
        self.epochs, self.cases, self.enabled, self.file = epochs, cases, enabled, file
        self._bar: tqdm | None = None
        self._key: str | None = None
        self._epoch = 0
        self._predicted = 0

    def _open(self, key: str, desc: str, total: int | None, unit: str) -> tqdm:
        if self._key != key:
            self.close()
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=True, disable=not self.enabled, file=self.file,
                             dynamic_ncols=True, bar_format="    {l_bar}{bar}| {n_fmt}/{total_fmt} "
                                                            "[{elapsed}<{remaining}{postfix}]")
            self._key = key
        return self._bar

    def feed(self, line: str) -> None:
        """One line (or carriage-return segment) of the child's output."""
        line = line.strip()
        if not line:
            return
        if (m := _EPOCH.search(line)) and self.epochs:
            self._epoch = int(m.group(1))
            self._open("epochs", "training (nnU-Net)", self.epochs, "epoch")
        elif _EPOCH_DONE.search(line) and self._key == "epochs":
            self._set(self._bar, self._epoch + 1)
        elif (m := _PSEUDO_DICE.search(line)) and self._key == "epochs":
            dice = ", ".join(f"{float(v):.3f}" for v in _NUMBER.findall(m.group(1)))
            self._bar.set_postfix_str(f"pseudo Dice {dice}", refresh=False)
        elif m := _CHILD_BAR.match(line):
            desc, total = (m.group("desc") or "working").strip(), int(m.group("total"))
            bar = self._open(f"child:{desc}", desc, total, "it")
            stats = [s.strip() for s in m.group("stats").split(",")[2:]]  # past "elapsed<remaining, rate"
            if stats:
                bar.set_postfix_str(", ".join(stats), refresh=False)
            self._set(bar, int(m.group("n")))
        elif _SCORED.match(line) and self.cases:
            self._predicted += 1
            self._set(self._open("cases", "predicting", self.cases, "case"), self._predicted)

    @staticmethod
    def _set(bar: tqdm, n: int) -> None:
        if n > bar.n:
            bar.update(n - bar.n)

    def close(self) -> None:
        """Finish the open bar."""
        if self._bar is not None:
            self._bar.close()
        self._bar, self._key = None, None


def run_logged(cmd: Sequence[str], env: dict[str, str], log: Path, relay: ProgressRelay) -> int:
    """Run ``cmd``, writing its combined output to ``log`` and feeding it to ``relay``; returns the exit code."""
    env = dict(env, PYTHONUNBUFFERED="1")  # lines as they happen, not in 8 KiB blocks
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    with open(log, "wb") as f, subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT) as proc:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            f.write(chunk)
            f.flush()
            *lines, pending = re.split(r"[\r\n]", pending + decoder.decode(chunk))
            for line in lines:
                relay.feed(line)
        relay.feed(pending + decoder.decode(b"", final=True))
        relay.close()
        return proc.wait()

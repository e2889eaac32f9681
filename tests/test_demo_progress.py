"""The demo's live progress: lines of nnU-Net's and the plugin's output become bars; everything reaches the log."""

from __future__ import annotations

import io
import sys

import pytest

from nnunet_ood.demo.progress import ProgressRelay, run_logged
from nnunet_ood.demo.run_demo import format_summary_table

TRAINING_LOG = """\
2026-11-24 12:42:57.877759: Epoch 0
2026-11-24 12:42:57.877900: Current learning rate: 0.01
2026-11-24 12:43:01.158204: train_loss 0.3633
2026-11-24 12:43:01.158505: Pseudo dice [np.float32(0.9051), np.float32(0.0)]
2026-11-24 12:43:01.158600: Epoch time: 3.33 s
2026-11-24 12:43:01.160000: Epoch 1
2026-11-24 12:43:04.709755: Pseudo dice [0.8783, 0.5]
2026-11-24 12:43:04.709800: Epoch time: 3.55 s
2026-11-24 12:43:04.709900: Yayy! New best EMA pseudo Dice: 0.8783
"""


def test_training_epochs_drive_one_bar_with_the_pseudo_dice():
    relay = ProgressRelay(epochs=20, file=io.StringIO())
    lines = TRAINING_LOG.splitlines()
    for line in lines[:5]:
        relay.feed(line)
    assert relay._bar.total == 20 and relay._bar.n == 1
    assert relay._bar.postfix == "pseudo Dice 0.905, 0.000"
    for line in lines[5:]:
        relay.feed(line)
    assert relay._bar.n == 2 and relay._bar.postfix == "pseudo Dice 0.878, 0.500"
    relay.close()
    assert "training (nnU-Net):  10%" in relay.file.getvalue()


def test_child_tqdm_bars_and_scored_cases_are_relayed():
    relay = ProgressRelay(cases=3, file=io.StringIO())
    relay.feed("fold 0: training SD autoencoder:   0%|          | 0/15 [00:00<?, ?it/s]")
    relay.feed("fold 0: training SD autoencoder:   7%|▋         | 1/15 [00:06<01:29,  6.39s/it, dice_ae=0.999, "
               "train=3143, val=2480]")
    bar = relay._bar
    assert (bar.desc.strip(": "), bar.total, bar.n) == ("fold 0: training SD autoencoder", 15, 1)
    assert bar.postfix == "dice_ae=0.999, train=3143, val=2480"
    relay.feed("fold 0: scoring the validation cases:  25%|██▌       | 3/12 [00:00<00:01,  9.1it/s]")
    assert relay._bar is not bar and (relay._bar.total, relay._bar.n) == (12, 3)  # a new phase, a new bar
    assert "fold 0: scoring" in relay._bar.desc
    for case in ("a", "b"):
        relay.feed(f"OOD {case}: no flag")
    relay.feed("OOD c: flagged by sd, tta")
    relay.feed("perform_everything_on_device: False")  # anything else: log only
    assert (relay._bar.total, relay._bar.n) == (3, 3)
    relay.close()
    drawn = relay.file.getvalue()
    assert "predicting: 100%" in drawn and "3/3" in drawn and "perform_everything" not in drawn


def test_run_logged_keeps_every_byte_and_feeds_carriage_return_segments(tmp_path):
    script = "import sys; sys.stdout.write('a: 50%|#   | 1/2 [00:01<00:01]\\ra: 100%|####| 2/2 [00:02<00:00]\\n'); " \
             "sys.stdout.write('OOD x: no flag\\n'); sys.stderr.write('warn\\n'); sys.exit(3)"
    seen: list[str] = []

    class Recorder(ProgressRelay):
        def feed(self, line: str) -> None:
            seen.append(line)
            super().feed(line)

    log = tmp_path / "child.log"
    code = run_logged([sys.executable, "-c", script], {}, log, Recorder(cases=1, enabled=False))
    assert code == 3
    assert "a: 50%" in seen[0] and "2/2" in seen[1] and "OOD x: no flag" in seen
    assert log.read_bytes().count(b"\r") == 1 and b"warn\n" in log.read_bytes()


@pytest.mark.parametrize("missed", ["0", "-"])
def test_summary_table_is_aligned_for_the_terminal(missed):
    markdown = ("# OOD summary\n\n- Best at ranking failures: **sd** (AURC 0.1).\n\n"
                "| group | cases | failures missed |\n|---|---:|---:|\n"
                f"| id_test | 16 | {missed} |\n| shift_strong | 16 | 12 |\n")
    text = format_summary_table(markdown).splitlines()
    assert text[0] == "- Best at ranking failures: sd (AURC 0.1)."
    table = text[2:]
    assert len({len(row) for row in table}) == 1  # every row as wide as the header
    assert table[0].split() == ["group", "cases", "failures", "missed"]
    assert set(table[1]) <= {"-", " "}
    assert table[2].split() == ["id_test", "16", missed] and table[3].endswith("12")


def test_summary_with_two_tables_keeps_each_aligned_in_place():
    markdown = ("# OOD summary\n\n- one.\n\n| a | bb |\n|---|---:|\n| x | 1 |\n\n## Accept or review: quality\n\n"
                "| method | AURC |\n|---|---:|\n| **quality** | 0.1 |\n| longer_name | 0.25 |\n\n- after.\n")
    text = format_summary_table(markdown).splitlines()
    assert text == ["- one.", "", "a  bb", "-  --", "x   1", "", "Accept or review: quality", "",
                    "method       AURC", "-----------  ----", "quality       0.1", "longer_name  0.25", "- after."]

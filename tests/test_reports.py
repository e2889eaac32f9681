"""``review.html``/``review.csv`` (``nnUNetv2_predict_ood --report``) and ``report.html`` (``nnUNetv2_evaluate_ood``)
on tiny synthetic prediction folders: 3D NIfTI images, segmentations, labels, maps and score tables written here.

Every page is parsed with the standard library's HTML parser: each ``<img src>`` must exist relative to the page,
each case must be present, in the order an independent sort computed here gives. Nothing is trained or predicted.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shutil
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import SimpleITK as sitk
from test_thumbnails import brute_force_slice

from nnunet_ood.errors import OODInputError
from nnunet_ood.reports.ranking import check_report_method
from nnunet_ood.reports.review import write_review

ENDING = ".nii.gz"
SHAPE = (5, 6, 7)  # z, y, x
LABELS = {"background": 0, "organ": 1, "lesion": 2}
CALIBRATION = {"A": {"low": 0.0, "high": 10.0, "threshold": 4.0, "false_alarm_rate": 0.05},
               "B": {"low": 1.0, "high": 3.0, "threshold": 2.0, "false_alarm_rate": 0.05}}
NAN = float("nan")


# ------------------------------------------------------------------------------------------- helpers


class Page(HTMLParser):
    """Images, links, ids, scripts and the cards (title, text, images, section) of a report page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.cards: list[dict] = []
        self.section: str | None = None
        self._details = 0  # open <details> elements: a card that starts inside one is folded
        self._depth = 0
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "h2" and "id" in a:
            self.section = a["id"]
        if tag == "details":
            self._details += 1
        if tag == "img":
            self.images.append(unquote(a["src"]))
            if self._depth:
                self.cards[-1]["images"].append(unquote(a["src"]))
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag == "div":
            if self._depth:
                self._depth += 1
            elif "card" in (a.get("class") or "").split():
                self._depth = 1
                self.cards.append({"title": "", "text": "", "images": [], "section": self.section,
                                   "folded": self._details > 0})
        if tag == "h3" and self._depth:
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "details":
            self._details -= 1
        if tag == "div" and self._depth:
            self._depth -= 1
        if tag == "h3":
            self._in_title = False

    def handle_data(self, data):
        if self._depth:
            self.cards[-1]["text"] += data
            if self._in_title:
                self.cards[-1]["title"] += data


def check_self_contained(page_path: Path) -> Page:
    """Parse a page: every image exists next to it, nothing comes from the network, no script."""
    text = page_path.read_text()
    page = Page(text)
    assert page.images, "a report without any image"
    for src in page.images:
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src
        assert (page_path.parent / src).is_file(), f"{src} referenced by {page_path.name} does not exist"
    assert "script" not in page.tags and "link" not in page.tags
    assert not any(h.startswith(("http:", "https:", "//")) for h in page.links)
    return page


def write_image(path: Path, array: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.7, 2.0))
    sitk.WriteImage(image, str(path))


def slice_of_card(card: dict) -> int:
    found = re.search(r"axial slice (\d+) of (\d+)", card["text"])
    assert found, card["text"]
    return int(found.group(1))


# ------------------------------------------------------------------------------------------- review data

# case -> method -> (score, normalized, ood); E has no calibration (normalised NaN, never flags)
REVIEW_SCORES = {
    "c00": {"A": (12.0, 1.0, True), "B": (5.0, 1.0, True)},  # tie at 1: B lies further beyond its range
    "c01": {"A": (11.0, 1.0, True), "B": (2.5, 0.75, True)},
    "c02": {"A": (NAN, NAN, True), "B": (1.5, 0.25, False)},  # A could not score it
    "c03": {"A": (3.0, 0.3, False), "B": (2.2, 0.6, True)},
    "c04": {"A": (2.0, 0.2, False), "B": (1.2, 0.1, False)},
    "c05": {"A": (2.0, 0.2, False), "B": (1.2, 0.1, False)},  # identical to c04: names decide
    "c06": {"A": (0.0, 0.0, False), "B": (1.0, 0.0, False)},
}


def make_review_folder(root: Path, maps: bool = True, names: dict[str, str] | None = None) -> tuple[Path, Path]:
    """An input folder (CASE_0000.nii.gz) and a prediction folder with segmentations, maps and score tables."""
    rng = np.random.default_rng(7)
    images, output = root / "images", root / "prediction"
    images.mkdir(parents=True)
    output.mkdir(parents=True)
    rows = ["case,method,score,normalized,ood"]
    for k, (case, scores) in enumerate(sorted(REVIEW_SCORES.items())):
        case = (names or {}).get(case, case)
        write_image(images / f"{case}_0000{ENDING}", rng.normal(size=SHAPE).astype(np.float32))
        write_image(output / f"{case}{ENDING}", (rng.random(SHAPE) < 0.3).astype(np.uint8))
        e_score = float(rng.random())
        for method, (score, normalized, ood) in [*scores.items(), ("E", (e_score, NAN, False))]:
            rows.append(f"{case},{method},{score!r},{normalized!r},{ood}")
            if maps:
                ood_map = rng.random(SHAPE).astype(np.float32)
                ood_map[(k + len(method)) % SHAPE[0]] += 3.0  # a hot slice that differs per case and method
                ood_map[0, 0, 0] = np.nan
                write_image(output / f"{case}_ood_{method}{ENDING}", ood_map)
    (output / "ood_scores.csv").write_text("\n".join(rows) + "\n")
    document = {"methods": ["A", "B", "E"], "calibration": CALIBRATION, "configuration": "3d_fullres",
                "ood_maps": {"dtype": "float32", "values": "score"} if maps else None}
    (output / "ood_scores.json").write_text(json.dumps(document))
    (output / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ENDING}))
    return images, output


def score_table(folder: Path) -> dict[str, dict[str, dict[str, float | bool]]]:
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    with open(folder / "ood_scores.csv", newline="") as f:
        for r in csv.DictReader(f):
            table[r["case"]][r["method"]] = {"score": float(r["score"]), "normalized": float(r["normalized"]),
                                            "ood": r["ood"] == "True"}
    return table


def expected_default_order(table) -> list[str]:
    """Flags (descending), then the mean of the finite normalised scores (descending; none = most uncertain)."""
    def key(case):
        values = table[case].values()
        finite = [v["normalized"] for v in values if not math.isnan(v["normalized"])]
        mean = sum(finite) / len(finite) if finite else math.inf
        return (-sum(v["ood"] for v in values), -mean, case)

    return sorted(table, key=key)


def expected_method_order(table, method: str) -> list[str]:
    """Unscored first, then the normalised score (descending; NaN lowest), then the raw score (descending)."""
    def key(case):
        v = table[case][method]
        if math.isnan(v["score"]):
            return (0, 0.0, 0.0, case)
        normalized = -math.inf if math.isnan(v["normalized"]) else v["normalized"]
        return (1, -normalized, -v["score"], case)

    return sorted(table, key=key)


def expected_overlay(values: dict[str, dict]) -> str:
    """Highest normalised score; ties by the unclipped (score - low) / (high - low)."""
    candidates = [m for m in values if not math.isnan(values[m]["normalized"])]

    def unclipped(m):
        c = CALIBRATION[m]
        return (values[m]["score"] - c["low"]) / (c["high"] - c["low"])

    return max(candidates, key=lambda m: (values[m]["normalized"], unclipped(m)))


def read_review_csv(folder: Path) -> list[dict[str, str]]:
    with open(folder / "review.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def review(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("review")
    images, output = make_review_folder(root)
    paths = write_review(str(images), str(output))
    return {"images": images, "output": output, "paths": paths, "table": score_table(output)}


# ------------------------------------------------------------------------------------------- review tests


def test_review_csv_and_page_follow_the_independent_default_order(review) -> None:
    output, table = review["output"], review["table"]
    assert [Path(p).name for p in review["paths"]] == ["review.html", "review.csv"]
    expected = expected_default_order(table)
    assert expected[:4] == ["c00", "c01", "c03", "c02"] and expected[4:6] == ["c04", "c05"]  # the data's intent
    rows = read_review_csv(output)
    assert [r["case"] for r in rows] == expected
    assert [int(r["rank"]) for r in rows] == list(range(1, len(expected) + 1))
    assert list(rows[0])[:6] == ["rank", "case", "decision", "reason", "n_flagged", "ranking_score"]
    assert list(rows[0])[6:] == [f"{m}_{k}" for m in ("A", "B", "E") for k in ("score", "normalized", "ood")]
    assert all(r["decision"] == "" and r["reason"] == "" for r in rows)  # no deciding method: no decision
    assert not any(c["folded"] for c in Page((output / "review.html").read_text()).cards)
    for r in rows:
        values = table[r["case"]]
        assert int(r["n_flagged"]) == sum(v["ood"] for v in values.values())
        finite = [v["normalized"] for v in values.values() if not math.isnan(v["normalized"])]
        assert float(r["ranking_score"]) == pytest.approx(sum(finite) / len(finite))
        for m, v in values.items():
            assert (r[f"{m}_score"] == "" and math.isnan(v["score"])) or float(r[f"{m}_score"]) == v["score"]
            assert r[f"{m}_ood"] == str(v["ood"])
    page = check_self_contained(output / "review.html")
    titles = [c["title"] for c in page.cards]
    assert [t.split()[1] for t in titles] == expected  # "#rank case ..."
    assert [t.split()[0] for t in titles] == [f"#{k}" for k in range(1, len(expected) + 1)]


def test_review_thumbnails_overlay_method_and_slice(review) -> None:
    output, table = review["output"], review["table"]
    page = Page((output / "review.html").read_text())
    for card in page.cards:
        case = card["title"].split()[1]
        overlay = expected_overlay(table[case])
        assert f"uncertainty: {overlay}" in card["text"]
        kinds = sorted(Path(src).stem.rsplit("_", 1)[1] for src in card["images"])
        assert kinds == ["image", "map", "prediction"]
        assert all(src.startswith("review_files/") for src in card["images"])
        ood_map = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}_ood_{overlay}{ENDING}")))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{case}{ENDING}")))
        sums = [float(np.nansum(ood_map[z])) for z in range(SHAPE[0])]  # NaN voxels ignored
        foreground = [int((seg[z] > 0).sum()) for z in range(SHAPE[0])]
        assert slice_of_card(card) == brute_force_slice(sums, foreground)
    assert expected_overlay(table["c00"]) == "B"  # the tie at 1 is decided by the range, not by the table order


def test_review_by_one_method(tmp_path, review) -> None:
    images, output = make_review_folder(tmp_path)
    for method in ("A", "E"):  # E has no normalised scores: its raw scores decide
        write_review(str(images), str(output), method)
        rows = read_review_csv(output)
        expected = expected_method_order(review["table"] if method == "A" else score_table(output), method)
        assert [r["case"] for r in rows] == expected
        page = check_self_contained(output / "review.html")
        assert [c["title"].split()[1] for c in page.cards] == expected
        assert all(f"uncertainty: {method}" in c["text"] for c in page.cards)
        for r in rows:
            normalized = score_table(output)[r["case"]][method]["normalized"]
            assert (r["ranking_score"] == "") == math.isnan(normalized)
    assert expected_method_order(review["table"], "A")[:3] == ["c02", "c00", "c01"]
    with pytest.raises(OODInputError, match="no scores"):
        write_review(str(images), str(output), "tta")


def test_review_without_maps_says_why(tmp_path) -> None:
    images, output = make_review_folder(tmp_path, maps=False)
    stale = output / "review_files"
    stale.mkdir()
    (stale / "old_map.png").write_bytes(b"stale")  # thumbnails of an earlier run do not linger
    write_review(str(images), str(output))
    page = check_self_contained(output / "review.html")
    text = (output / "review.html").read_text()
    assert "--save_ood_maps" in text
    assert not any(src.endswith("_map.png") for src in page.images)
    assert not (stale / "old_map.png").exists()
    assert len(page.cards) == len(REVIEW_SCORES)
    for card in page.cards:  # the slice with the most segmented voxels
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(output / f"{card['title'].split()[1]}{ENDING}")))
        foreground = [int((seg[z] > 0).sum()) for z in range(SHAPE[0])]
        assert slice_of_card(card) == brute_force_slice(foreground, [0] * SHAPE[0])
    write_review(None, str(output))  # input folder unknown: no image thumbnails, said on the page
    page = check_self_contained(output / "review.html")
    assert not any(src.endswith("_image.png") for src in page.images)
    assert "input folder is not known" in (output / "review.html").read_text()


def test_review_escapes_case_names(tmp_path) -> None:
    odd = 'x<b>&"y'
    images, output = make_review_folder(tmp_path, names={"c00": odd})
    write_review(str(images), str(output))
    text = (output / "review.html").read_text()
    assert odd not in text and "x&lt;b&gt;&amp;&quot;y" in text
    page = check_self_contained(output / "review.html")
    assert odd in [c["title"].split(" ", 1)[1].rsplit(" flagged", 1)[0] for c in page.cards]
    assert any(r["case"] == odd for r in read_review_csv(output))


# case -> (predicted risk, decision, reason, the gate's p-value in the case's record); reviews: unscored first, then
# the highest risk (c01, c00, c03, c02); accepted after them, same order (c06, c04, c05)
DECISIONS = {
    "c00": (0.6, "review", "predicted Dice 0.40 < 0.70", 0.3),
    "c01": (NAN, "review", "could not be scored", None),
    "c02": (0.1, "review", "unusual for A (p = 0.004)", 0.004),
    "c03": (0.35, "review", "predicted Dice 0.65 < 0.70; unusual for B (p = 0.02)", 0.02),
    "c04": (0.2, "accept", "", 0.5),
    "c05": (0.05, "accept", "", 0.3),
    "c06": (0.25, "accept", "", 0.8),
}
STATEMENT = "Estimated on the fold's 12 validation cases & their versions <synthetic shifts, no guarantee>."
GATE_LEVEL = 0.05


def make_decision_folder(root: Path, name: str, with_rules: bool = True) -> tuple[Path, Path]:
    """The review folder plus a deciding method ``name`` (rows with decision and reason, its decision_rules with a
    statement and an active gate, per-case records with the gate's p-value)."""
    images, output = make_review_folder(root)
    with open(output / "ood_scores.csv", newline="") as f:
        rows = [{**r, "decision": "", "reason": ""} for r in csv.DictReader(f)]
    for case, (risk, decision, reason, p_value) in DECISIONS.items():
        rows.append({"case": case, "method": name, "score": repr(risk), "normalized": repr(risk),
                     "ood": str(decision == "review"), "decision": decision, "reason": reason})
        record = {"case": case, "run_signature": "x", "methods": {name: {"score": None if math.isnan(risk) else risk,
                                                                          "unusual_p": p_value}}}
        (output / "ood_cases").mkdir(exist_ok=True)
        (output / "ood_cases" / f"{case}.json").write_text(json.dumps(record))
    with open(output / "ood_scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "method", "score", "normalized", "ood", "decision", "reason"])
        writer.writeheader()
        writer.writerows(rows)
    document = json.loads((output / "ood_scores.json").read_text())
    document["methods"].append(name)
    if with_rules:
        document["decision_rules"] = {name: {"rule": "ltt", "max_silent_failures": 0.1, "threshold": 0.3,
                                             "gate": {"level": GATE_LEVEL, "active": True, "scores": ["A", "B"]},
                                             "statement": STATEMENT}}
    (output / "ood_scores.json").write_text(json.dumps(document))
    return images, output


def expected_decision_order(key) -> list[str]:
    """Reviews before accepted cases; within each, ``key``."""
    return sorted(DECISIONS, key=lambda c: (DECISIONS[c][1] != "review", key(c)))


def by_risk(case: str) -> tuple:
    risk = DECISIONS[case][0]
    return (0, 0.0, case) if math.isnan(risk) else (1, -risk, case)


@pytest.mark.parametrize("name, with_rules", [("quality", True), ("Q", True), ("quality", False)])
def test_review_leads_with_the_decision(tmp_path, name, with_rules) -> None:
    """"Q" is no registered method: the decision_rules make it the deciding one; "quality" without decision_rules
    (predicted before they existed) is found through the registry."""
    images, output = make_decision_folder(tmp_path, name, with_rules)
    write_review(str(images), str(output))
    expected = expected_decision_order(by_risk)
    assert expected == ["c01", "c00", "c03", "c02", "c06", "c04", "c05"]  # the data's intent
    rows = read_review_csv(output)
    assert [r["case"] for r in rows] == expected
    assert list(rows[0])[:6] == ["rank", "case", "decision", "reason", "n_flagged", "ranking_score"]
    for r in rows:
        risk, decision, reason, _ = DECISIONS[r["case"]]
        assert (r["decision"], r["reason"]) == (decision, reason)
        assert (r["ranking_score"] == "" and math.isnan(risk)) or float(r["ranking_score"]) == risk

    text = (output / "review.html").read_text()
    page = check_self_contained(output / "review.html")
    assert [c["title"].split()[1] for c in page.cards] == expected
    first_card = text.index('class="card ')
    if with_rules:
        assert STATEMENT not in text and page_text(text).index(STATEMENT) < page_text(text).index("Cases to review")
        # the drift line: 6 cases with a p-value (c01 has none), 2 of them at or below the gate's level
        p_values = [p for *_, p in DECISIONS.values() if p is not None]
        unusual = sum(p <= GATE_LEVEL for p in p_values)
        assert f"{unusual} of {len(p_values)} cases unusual" in page_text(text)
        assert text.index("cases unusual") < first_card
    else:
        assert "no statement of its rule" in text and "cases unusual" not in text
    assert text.index('id="review"') < first_card < text.index('id="accepted"')
    for card in page.cards:
        case = card["title"].split()[1]
        risk, decision, reason, _ = DECISIONS[case]
        shown = "-" if math.isnan(risk) else f"{1 - risk:.2f}"
        assert f"predicted Dice ({name}): {shown}" in card["text"]
        assert "scores of all 4 methods" in card["text"]  # every method's scores folded in the card
        assert len(card["images"]) == 3
        if decision == "review":
            assert card["section"] == "review" and not card["folded"]
            assert reason in card["text"] and "review" in card["title"]
        else:
            assert card["section"] == "accepted" and card["folded"]  # accepted cases inside <details>
            assert "accept" in card["title"]


def page_text(html_text: str) -> str:
    """The text of a page as a reader sees it (tags dropped, entities decoded)."""
    import html as html_module

    return html_module.unescape(re.sub(r"<[^>]+>", " ", html_text))


def test_review_decision_first_with_report_method(tmp_path) -> None:
    images, output = make_decision_folder(tmp_path, "quality")
    write_review(str(images), str(output), "A")
    table = score_table(output)
    order_a = expected_method_order(table, "A")
    expected = expected_decision_order(order_a.index)
    rows = read_review_csv(output)
    assert [r["case"] for r in rows] == expected
    assert expected != expected_decision_order(by_risk)  # A orders the parts differently
    page = check_self_contained(output / "review.html")
    assert [c["title"].split()[1] for c in page.cards] == expected
    assert all("uncertainty: A" in c["text"] for c in page.cards)


def test_predict_report_flags_fail_in_one_line_before_anything_is_written(tmp_path, capsys) -> None:
    from nnunet_ood.cli.predict import main

    out = tmp_path / "out"
    base = ["-i", str(tmp_path), "-o", str(out), "-d", "999", "-c", "2d"]
    for extra, message in ((["--report", "--report_method", "bogus"], "not an OOD method"),
                           (["--report_method", "sd"], "add --report")):
        with pytest.raises(SystemExit) as info:
            main([*base, *extra])
        assert info.value.code != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err
        assert not out.exists()
    with pytest.raises(OODInputError, match="not computed"):
        check_report_method("tta", ["mahalanobis", "sd"])
    check_report_method("sd", ["mahalanobis", "sd"])
    check_report_method(None, ["mahalanobis"])


# ------------------------------------------------------------------------------------------- evaluation data

GROUP_SIZES = {"id_test": 4, "id_val": 5, "scanner": 5}
BAD = {"scanner": {0: 0.9, 1: 0.7, 3: 0.8}}  # case index -> share of voxels mislabelled (failures)


def numpy_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    values = []
    for label in (1, 2):
        p, r = pred == label, ref == label
        total = p.sum() + r.sum()
        values.append(1.0 if total == 0 else 2.0 * (p & r).sum() / total)
    return float(np.mean(values))


@pytest.fixture(scope="module")
def evaluation_project(tmp_path_factory) -> dict:
    """nnU-Net raw layout (imagesTs_x next to labelsTs_x; id_val's labels elsewhere) and prediction folders."""
    root = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(11)
    data: dict = {"root": root, "cases": {}, "scores": {}, "folders": {}}
    for group, n in GROUP_SIZES.items():
        images = root / "raw" / f"imagesTs_{group}"
        labels = root / "raw" / (f"labelsTs_{group}" if group != "id_val" else "validation_references")
        prediction = root / "predictions" / group
        for folder in (images, labels, prediction):
            folder.mkdir(parents=True)
        rows = ["case,method,score,normalized,ood"]
        data["cases"][group], data["scores"][group] = {}, {"A": [], "B": []}
        for i in range(n):
            case = f"{group}_{i:03d}"
            ref = np.zeros(SHAPE, dtype=np.uint8)
            ref[:, 1:5, 1:6] = 1
            ref[1:4, 2:4, 2:4] = 2
            pred = ref.copy()
            share = BAD.get(group, {}).get(i, 0.05)
            for z in range(SHAPE[0]):  # errors differ per slice: the disagreement slice is well defined
                flip = rng.random(SHAPE[1:]) < share * (z + 1) / SHAPE[0]
                pred[z][flip] = rng.integers(0, 3, size=int(flip.sum()))
            write_image(images / f"{case}_0000{ENDING}", rng.normal(size=SHAPE).astype(np.float32))
            write_image(labels / f"{case}{ENDING}", ref)
            write_image(prediction / f"{case}{ENDING}", pred)
            dice = numpy_dice(pred, ref)
            # A tracks the errors but misses one failure (scanner_003); B is highest for the best segmentations
            a = 10.0 * (1.0 - dice) + rng.random() * 0.1 if case != "scanner_003" else 0.5
            b = 3.0 * dice + rng.random() * 0.01
            for method, score in (("A", a), ("B", b)):
                c = CALIBRATION[method]
                normalized = (min(max(score, c["low"]), c["high"]) - c["low"]) / (c["high"] - c["low"])
                rows.append(f"{case},{method},{score!r},{normalized!r},{score > c['threshold']}")
                data["scores"][group][method].append(score)
                write_image(prediction / f"{case}_ood_{method}{ENDING}", rng.random(SHAPE).astype(np.float32))
            data["cases"][group][case] = (pred, ref, dice)
        (prediction / "ood_scores.csv").write_text("\n".join(rows) + "\n")
        (prediction / "ood_scores.json").write_text(json.dumps({"calibration": CALIBRATION}))
        (prediction / "dataset.json").write_text(json.dumps({"labels": LABELS, "file_ending": ENDING}))
        data["folders"][group] = (prediction, labels, images)
    return data


def evaluation_args(project: dict, domain_name: str = "scanner", root: Path | None = None) -> list[str]:
    def pair(group):
        prediction, labels, _ = project["folders"][group]
        if root is not None:
            prediction = root / "predictions" / group
        return [str(prediction), str(labels)]

    return ["--id_test", *pair("id_test"), "--id_val", *pair("id_val"), "--domain", domain_name, *pair("scanner")]


def run_evaluate(argv: list[str]) -> str:
    from nnunet_ood.cli.evaluate import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        main(argv)
    return stdout.getvalue()


@pytest.fixture(scope="module")
def evaluation_report(evaluation_project, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("report") / "evaluation"
    _, _, val_images = evaluation_project["folders"]["id_val"]
    stdout = run_evaluate([*evaluation_args(evaluation_project), "-o", str(out), "--report_cases", "3",
                           "--images", "id_val", str(val_images)])
    return {"out": out, "stdout": stdout}


# ------------------------------------------------------------------------------------------- evaluation tests


def test_evaluation_report_headline_matches_the_summary(evaluation_report) -> None:
    out = evaluation_report["out"]
    assert "report.html" in evaluation_report["stdout"]
    page = check_self_contained(out / "report.html")
    summary = (out / "ood_summary.md").read_text()
    best_shift, best_failure = re.findall(r"\*\*(\w+)\*\*", summary)
    text = (out / "report.html").read_text()
    assert f"Best at detecting shifted cases: <b>{best_shift}</b>" in text
    assert f"Best at predicting failures: <b>{best_failure}</b>" in text
    assert best_failure == "A"  # A tracks the errors by construction
    for plot in ("score_distributions.png", "correlation_with_failure.png", "dice_vs_uncertainty_A.png",
                 "dice_vs_uncertainty_B.png", "risk_coverage.png"):
        assert plot in page.images
    for method in ("A", "B"):  # the metric table has a row per method
        assert re.search(rf"<td class=\"t\">{method}</td>", text)


def test_evaluation_galleries_against_independent_selection(evaluation_project, evaluation_report) -> None:
    page = Page((evaluation_report["out"] / "report.html").read_text())
    cases = evaluation_project["cases"]
    threshold = float(np.percentile(evaluation_project["scores"]["id_val"]["A"], 95))
    compared = [(g, c, i) for g in ("id_test", "scanner") for i, c in enumerate(cases[g])]
    silent = [(cases[g][c][2], g, c) for g, c, i in compared
              if cases[g][c][2] < 0.6 and not evaluation_project["scores"][g]["A"][i] > threshold]
    expected_silent = [c for _, _, c in sorted(silent)][:3]
    assert expected_silent == ["scanner_003"]  # the failure A misses, by construction
    by_score = sorted(compared, key=lambda x: (-evaluation_project["scores"][x[0]]["A"][x[2]], x[0], x[1]))
    expected_uncertain = [c for _, c, _ in by_score[:3]]
    shown = {section: [c["title"].split()[0] for c in page.cards if c["section"] == section]
             for section in ("silent", "uncertain")}
    assert shown == {"silent": expected_silent, "uncertain": expected_uncertain}
    for card in page.cards:
        case = card["title"].split()[0]
        group = case.rsplit("_", 1)[0]
        pred, ref, dice = cases[group][case]
        assert f"Dice {dice:.3f}" in card["text"]
        differ = [int((pred[z] != ref[z]).sum()) for z in range(SHAPE[0])]
        foreground = [int(((pred[z] > 0) | (ref[z] > 0)).sum()) for z in range(SHAPE[0])]
        assert slice_of_card(card) == brute_force_slice(differ, foreground)
        kinds = sorted(Path(src).stem.rsplit("_", 1)[1] for src in card["images"])
        assert kinds == ["image", "map", "prediction", "reference"]


def test_evaluation_report_without_images_maps_or_report(evaluation_project, tmp_path) -> None:
    copy = tmp_path / "copy"
    for group in GROUP_SIZES:
        prediction = evaluation_project["folders"][group][0]
        shutil.copytree(prediction, copy / "predictions" / group,
                        ignore=shutil.ignore_patterns("*_ood_*"))  # predicted without --save_ood_maps
    out = tmp_path / "evaluation"
    run_evaluate([*evaluation_args(evaluation_project, root=copy), "-o", str(out)])  # no --images for id_val
    text = (out / "report.html").read_text()
    page = check_self_contained(out / "report.html")
    assert "--save_ood_maps" in text
    assert not any(src.endswith("_map.png") for src in page.images)
    assert any(src.endswith("_image.png") for src in page.images)  # imagesTs_x next to labelsTs_x
    quiet = tmp_path / "quiet"
    run_evaluate([*evaluation_args(evaluation_project), "-o", str(quiet), "--no_report"])
    assert (quiet / "ood_summary.md").is_file()
    assert not (quiet / "report.html").exists() and not (quiet / "report_files").exists()


def test_evaluation_report_without_image_folder_says_so(evaluation_project, tmp_path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(evaluation_project["root"] / "raw", raw,
                    ignore=shutil.ignore_patterns("imagesTs_scanner"))
    args = evaluation_args(evaluation_project)
    args[args.index("--domain") + 3] = str(raw / "labelsTs_scanner")
    out = tmp_path / "evaluation"
    run_evaluate([*args, "-o", str(out)])
    page = check_self_contained(out / "report.html")
    text = (out / "report.html").read_text()
    assert "Input images not found for scanner" in text and "--images" in text
    scanner_cards = [c for c in page.cards if c["title"].startswith("scanner_")]
    assert scanner_cards and all(not any(s.endswith("_image.png") for s in c["images"]) for c in scanner_cards)
    assert all(any(s.endswith("_reference.png") for s in c["images"]) for c in scanner_cards)


def test_evaluation_report_escapes_names(evaluation_project, tmp_path) -> None:
    out = tmp_path / "evaluation"
    run_evaluate([*evaluation_args(evaluation_project, domain_name="<i>B&C"), "-o", str(out)])
    text = (out / "report.html").read_text()
    assert "<i>B&C" not in text and "&lt;i&gt;B&amp;C" in text
    check_self_contained(out / "report.html")


@pytest.mark.parametrize("extra, message", [
    (["--images", "elsewhere", "."], "not evaluated"),
    (["--images", "id_test", "/nonexistent/folder"], "does not exist"),
    (["--report_cases", "0"], "--report_cases must be an integer in 1..10000, got 0"),
])
def test_evaluate_report_flags_fail_in_one_line(evaluation_project, tmp_path, capsys, extra, message) -> None:
    from nnunet_ood.cli.evaluate import main

    out = tmp_path / "evaluation"
    with pytest.raises(SystemExit) as info:
        main([*evaluation_args(evaluation_project), "-o", str(out), *extra])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------- decisions


def decision_table(text: str) -> dict[tuple[str, str], list[str]]:
    """(method, cases) -> the other cells of the report's table of prediction-time decisions."""
    section = text[text.index('id="decisions"'):]
    section = section[:section.index("</table>")]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", section)[1:]:  # the first row is the header
        cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def upper_bound_95(failures: int, accepted: int) -> float:
    """Exact one-sided 95% upper bound of a failure rate, from scipy's binomial test (two-sided 90% interval)."""
    from scipy.stats import binomtest

    return binomtest(failures, accepted).proportion_ci(confidence_level=0.90, method="exact").high if accepted else NAN


def counted_decisions(project: dict, method: str, groups: list[str], fail_below: float = 0.6) -> list[float]:
    """n, coverage, silent, silent among the accepted and its 95% upper bound: by counting the fixture's cases
    (flag = score > threshold)."""
    n = accepted = silent = 0
    for group in groups:
        for (_, _, dice), score in zip(project["cases"][group].values(), project["scores"][group][method]):
            ok = not score > CALIBRATION[method]["threshold"]
            n, accepted, silent = n + 1, accepted + ok, silent + (ok and dice < fail_below)
    return [n, accepted / n, silent / n, silent / accepted if accepted else NAN, upper_bound_95(silent, accepted)]


def test_evaluation_report_decision_table(evaluation_project, evaluation_report) -> None:
    text = (evaluation_report["out"] / "report.html").read_text()
    table = decision_table(text)
    assert set(table) == {(m, c) for m in "AB" for c in ("id_test", "all shifted")}
    for (method, cases), cells in table.items():
        expected = counted_decisions(evaluation_project, method, ["id_test"] if cases == "id_test" else ["scanner"])
        assert cells[0] == str(expected[0])
        assert cells[1:5] == [f"{v:.3f}" if not math.isnan(v) else "-" for v in expected[1:]]
        assert cells[5:] == ["-", "-"]  # A and B do not predict the Dice
    assert counted_decisions(evaluation_project, "A", ["scanner"])[2] > 0  # scanner_003: accepted and failed


@pytest.fixture(scope="module")
def quality_report(evaluation_project, tmp_path_factory) -> dict:
    """The evaluation project plus a method "quality" (predicts the Dice): risk = 1 - Dice + 0.05 (+ noise),
    flagged above 0.2, with a decision column; evaluated with --fail_below 0.8."""
    copy = tmp_path_factory.mktemp("quality_report")
    rng = np.random.default_rng(5)
    risks: dict[str, list[float]] = {}
    for group in GROUP_SIZES:
        prediction = copy / "predictions" / group
        shutil.copytree(evaluation_project["folders"][group][0], prediction)
        lines = (prediction / "ood_scores.csv").read_text().splitlines()
        lines = [lines[0] + ",decision"] + [line + "," for line in lines[1:]]
        risks[group] = []
        for case, (_, _, dice) in evaluation_project["cases"][group].items():
            risk = min(1.0, 1.0 - dice + 0.05 + 0.01 * rng.random())
            risks[group].append(risk)
            lines.append(f"{case},quality,{risk!r},{risk!r},{risk > 0.2},{'review' if risk > 0.2 else 'accept'}")
        (prediction / "ood_scores.csv").write_text("\n".join(lines) + "\n")
        calibration = {**CALIBRATION, "quality": {"low": 0.0, "high": 1.0, "threshold": 0.2}}
        (prediction / "ood_scores.json").write_text(json.dumps({"calibration": calibration}))
    out = copy / "evaluation"
    run_evaluate([*evaluation_args(evaluation_project, root=copy), "-o", str(out), "--fail_below", "0.8"])
    return {"out": out, "risks": risks}


def test_evaluation_report_with_a_dice_predicting_method(evaluation_project, quality_report) -> None:
    out = quality_report["out"]
    page = check_self_contained(out / "report.html")
    assert "risk_coverage.png" in page.images and (out / "risk_coverage.png").is_file()
    assert page.images.index("risk_coverage.png") < page.images.index("score_distributions.png")
    text = (out / "report.html").read_text()
    assert "Dice &lt; 0.8" in text and "Dice &lt; 0.6" not in text  # --fail_below reaches every sentence
    cases, risks = evaluation_project["cases"], quality_report["risks"]
    dice = {g: np.array([d for _, _, d in cases[g].values()]) for g in ("id_test", "scanner")}
    risk = {g: np.array(risks[g]) for g in ("id_test", "scanner")}
    table = decision_table(text)
    assert list(table)[:2] == [("quality", "id_test"), ("quality", "all shifted")]  # first
    assert re.search(r'<td class="t"><b>quality</b></td><td class="t">id_test</td>', text)
    for group, cases_name in (("id_test", "id_test"), ("scanner", "all shifted")):
        accepted = risk[group] <= 0.2
        silent = accepted & (dice[group] < 0.8)
        cells = table[("quality", cases_name)]
        assert cells[1] == f"{accepted.mean():.3f}" and cells[2] == f"{silent.mean():.3f}"
        assert cells[5] == f"{np.mean(np.abs((1 - risk[group]) - dice[group])):.3f}"
        assert cells[6] == f"{np.corrcoef(1 - risk[group], dice[group])[0, 1]:.3f}"
    id_accepted = (risk["id_test"] <= 0.2).mean()
    assert "Accept/review decision of <b>quality</b>" in text
    assert f"on the ID test cases it accepts {id_accepted:.1%}" in text
    summary = (out / "ood_summary.md").read_text()
    (line,) = [ln for ln in summary.splitlines() if ln.startswith("| scanner |")]
    assert line.split("|")[4].strip() == str(int((dice["scanner"] < 0.8).sum()))  # failures at --fail_below 0.8


def test_evaluation_headline_leads_with_the_decision_and_its_upper_bound(evaluation_project, quality_report) -> None:
    """Per group: coverage, failures among accepted and the exact 95% upper bound, counted here and bounded by
    scipy's binomial test; the table is the first thing in the headline."""
    text = (quality_report["out"] / "report.html").read_text()
    headline = text[text.index('<h2 id="headline">'):text.index('<h2 id="metrics">')]
    assert headline.index('id="decision-quality"') < headline.index("Best at detecting shifted cases")
    table = headline[headline.index('id="decision-quality"'):]
    table = table[:table.index("</table>")]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        rows[cells[0]] = cells[1:]
    assert list(rows) == ["id_test", "scanner"]  # one domain: no pooled row
    for group in ("id_test", "scanner"):
        dice = np.array([d for _, _, d in evaluation_project["cases"][group].values()])
        accepted = np.array(quality_report["risks"][group]) <= 0.2
        k, n = int(np.sum(accepted & (dice < 0.8))), int(accepted.sum())
        assert rows[group][0] == str(dice.size)
        assert rows[group][1] == f"{n} ({n / dice.size:.1%})"
        assert rows[group][2] == (f"{k} ({k / n:.1%})" if n else "0 (-)")
        assert rows[group][3] == (f"{upper_bound_95(k, n):.1%}" if n else "-")
    assert any(int(r[1].split()[0]) > 0 for r in rows.values())  # the fixture accepts cases somewhere


def test_overlay_is_never_a_method_without_maps() -> None:
    """quality has no voxel map: asked for or scoring highest, the overlay falls to the highest method with maps."""
    from nnunet_ood.reports.ranking import MethodScore, overlay_method

    scores = {"mahalanobis": MethodScore(10.0, 0.4, False), "entropy": MethodScore(0.2, 0.7, True),
              "quality": MethodScore(0.9, 0.9, True)}
    methods = ["mahalanobis", "entropy", "quality"]
    assert overlay_method(scores, methods, None) == "entropy"
    assert overlay_method(scores, methods, "quality") == "entropy"
    assert overlay_method(scores, methods, "mahalanobis") == "mahalanobis"
    # --save_ood_maps mahalanobis: the entropy map was not written, so the overlay is the one that was
    assert overlay_method(scores, methods, None, with_maps=["mahalanobis"]) == "mahalanobis"
    assert overlay_method(scores, methods, "entropy", with_maps=["mahalanobis"]) == "mahalanobis"


def test_review_shows_quality_as_a_decision() -> None:
    from nnunet_ood.reports.review import _flag_text

    assert (_flag_text("quality", True), _flag_text("quality", False)) == ("review", "accept")
    assert (_flag_text("mahalanobis", True), _flag_text("mahalanobis", False)) == ("OOD", "ok")
    assert _flag_text("Q", True, deciding="Q") == "review"  # known as the deciding method from decision_rules


def test_image_folders_come_from_the_flag_then_the_recorded_input_then_the_raw_layout(tmp_path) -> None:
    from nnunet_ood.evaluation.groups import GroupSpec
    from nnunet_ood.reports.image_sources import resolve_image_sources

    folders = {name: tmp_path / name for name in ("given", "recorded", "imagesTs_b", "labelsTs_b", "labelsTs_c",
                                                  "pred_a", "pred_b", "pred_c", "pred_d")}
    for folder in folders.values():
        folder.mkdir()
    # a recorded input folder wins over the raw layout; a recorded folder that no longer exists is ignored
    (folders["pred_b"] / "ood_scores.json").write_text(json.dumps({"input_folder": str(folders["recorded"])}))
    (folders["pred_c"] / "ood_scores.json").write_text(json.dumps({"input_folder": str(tmp_path / "moved")}))
    (folders["pred_d"] / "ood_scores.json").write_text("[not an object]")
    specs = [GroupSpec("a", "domain", str(folders["pred_a"]), str(folders["labelsTs_b"])),
             GroupSpec("b", "domain", str(folders["pred_b"]), str(folders["labelsTs_b"])),
             GroupSpec("c", "domain", str(folders["pred_c"]), str(folders["labelsTs_b"])),
             GroupSpec("d", "domain", str(folders["pred_d"]), str(folders["labelsTs_c"]))]
    sources = resolve_image_sources(specs, [("a", str(folders["given"]))])
    assert {g: s.folder for g, s in sources.items()} == {
        "a": str(folders["given"]), "b": str(folders["recorded"]), "c": str(folders["imagesTs_b"]), "d": None}

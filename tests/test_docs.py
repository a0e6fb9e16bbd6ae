"""docs/ and README.md stay true to the code: the walkthrough's numbers and picture come from its
script, every pytest command the pages quote selects tests, every relative link and named file
exists, README.md stays short, only bench/journal.md speaks of how the project was developed and
bench/ keeps only the raw files docs/results.md cites; and tinygrad3.draw draws what a graph holds."""
import concurrent.futures
import pathlib
import re
import shlex
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import tinygrad3.functional as F
from tinygrad3 import Function, Tensor
from tinygrad3.draw import draw, function_lines, record_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
JOURNAL = ROOT / "bench" / "journal.md"
PAGES = sorted(DOCS.rglob("*.md")) + [README]
OPS = ("rmsnorm", "rope", "attention", "geglu", "cross_entropy", "linear_cross_entropy", "embedding")
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """(printed lines, the directory it drew into) of one run of docs/walkthrough.py."""
    out = tmp_path_factory.mktemp("walkthrough")
    run = subprocess.run([sys.executable, str(DOCS / "walkthrough.py"), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [line for line in run.stdout.splitlines() if line.strip()], out


def test_every_number_the_walkthrough_prints_is_on_its_page(walkthrough):
    lines, _ = walkthrough
    page = set((DOCS / "walkthrough.md").read_text().splitlines())
    assert len(lines) > 60 and lines[0].startswith("model: Gemma3Config.tiny()")  # the whole report ran
    missing = [line for line in lines if line not in page]
    assert not missing, "docs/walkthrough.md is out of date; rerun python docs/walkthrough.py and update:\n" + \
        "\n".join(missing)


def test_the_walkthrough_redraws_the_committed_picture(walkthrough):
    _, out = walkthrough
    drawn = (out / "decoder_layer.svg").read_text()
    assert drawn == (DOCS / "decoder_layer.svg").read_text(), "rerun python docs/walkthrough.py"
    texts = [t.text for t in ET.fromstring(drawn).iter(SVG + "text")]
    for label in ("ResidualRMSNorm", "Attention", "GeGLU", "h (residual stream)", "self_attn.q_proj.weight",
                  "p (2, 1, 64, 16) float32", "w = mlp.down_proj.weight"):
        assert label in texts, label
    assert texts.count("Linear") == 6 and texts.count("RMSNorm") == 4  # q, k, v, o; gate + up as one; down


# ----- the pages ------------------------------------------------------------------------------

def pytest_commands(pages):
    """Every `python -m pytest ...` the pages quote (inline or in code blocks), without comments."""
    found = set()
    for page in pages:
        for match in re.finditer(r"python -m pytest[^`#\n]*", page.read_text()):
            found.add(match.group(0).strip())
    return sorted(found)


def collected(command):
    """(exit status, tests collected, the output's end) of `command` run with --collect-only."""
    args = [a for a in shlex.split(command)[3:] if a != "-q"]
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", run.stdout)
    return run.returncode, int(match.group(1)) if match else 0, run.stdout[-2000:]


def test_every_op_page_quotes_a_gradcheck_command():
    for op in OPS:
        page = DOCS / "ops" / f"{op}.md"
        assert page.exists(), page
        text = page.read_text()
        assert "## Gradient check" in text and pytest_commands([page]), f"{page} quotes no gradcheck command"


def test_every_quoted_pytest_command_of_the_op_pages_selects_tests():
    commands = pytest_commands(sorted((DOCS / "ops").glob("*.md")))
    assert len(commands) >= len(OPS)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(commands, pool.map(collected, commands)))
    empty = [f"{command}: exit {code}, {n} collected\n{tail}" for command, (code, n, tail) in results.items()
             if code != 0 or n == 0]
    assert not empty, "\n\n".join(empty)


def test_every_test_file_a_quoted_command_names_exists():
    named = {arg for command in pytest_commands(PAGES) for arg in shlex.split(command) if arg.startswith("tests/")}
    assert named and not [arg for arg in named if not (ROOT / arg.split("::")[0]).exists()]


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}:
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_file_the_pages_name_exists():
    missing = []
    for page in PAGES:
        for name in re.findall(r"`((?:tinygrad3|nn|models|data|tests|bench|docs)/[\w./-]+)(?:::(\w+))?`",
                               page.read_text()):
            path, function = name
            if not (path.endswith("/") or re.search(r"\.(py|md|json|svg|png|csv)$", path)):
                continue  # a directory a command creates (data/prepared/...), not a file of the tree
            if not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
            elif function and f"def {function}(" not in (ROOT / path).read_text():
                missing.append(f"{page.relative_to(ROOT)}: {path}::{function}")
    assert not missing, "\n".join(missing)


def test_the_readme_links_every_docs_page_and_stays_short():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/ (at most 250)"
    linked = set(re.findall(r"\]\(docs/([\w/]+\.md)", text))
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and p.name not in linked]
    assert not unlinked, f"README.md links no docs page for: {unlinked}"


# Words about how the project was developed: sessions, issue numbers, machines lent, the starting
# notebook. Word bounds keep software words out ("silent", "--seed", "seeded", "a random seed").
HISTORY = re.compile(r"\bsessions?\b|\bissues? [0-9]|\blent\b|\bthe seed\b", re.IGNORECASE)


def history_hits(path):
    """(path, line number, line) of every history word in one text file; none in a binary file."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return []
    return [(path.relative_to(ROOT), i, line.strip()) for i, line in enumerate(text.splitlines(), 1)
            if HISTORY.search(line)]


def test_the_history_pattern_finds_history_and_not_software():
    for line in ("### Fourth session, NVIDIA H200", "Throughput (issue 7)", "the only GPU lent in that",
                 "not the seed's 1e-4", "over several Sessions"):
        assert HISTORY.search(line), line
    for line in ("--seed 0", "streams seeded from (seed, rank)", "a random seed", "never a silent wrap",
                 "two equivalent ways", "the seeds 0 and 1"):
        assert not HISTORY.search(line), line


def test_only_the_journal_speaks_of_the_development():
    files = [README] + [p for top in ("docs", "bench") for p in sorted((ROOT / top).rglob("*"))
                        if p.is_file() and p != JOURNAL and "__pycache__" not in p.parts]
    hits = [hit for path in files for hit in history_hits(path)]
    assert not hits, "history belongs in bench/journal.md:\n" + "\n".join(f"{p}:{i}: {t}" for p, i, t in hits)
    assert "development journal" in JOURNAL.read_text().splitlines()[0].lower()


# ----- bench/'s raw files ---------------------------------------------------------------------

# bench/runs/ holds only the raw files docs/results.md cites, named date_commit_GPU_what.
RUN_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_[0-9a-f]{7}_(h100|h200)_[a-z0-9_]+\.(json|csv|png|txt)$")
RAW = (".json", ".csv", ".png", ".txt")
CITED = re.compile(r"bench/[\w./-]*[\w/]")


def raw_file_problems(root):
    """Every break of bench/'s rule under root: a misnamed or uncited file in bench/runs/, a cited
    bench/ path that does not exist, a raw file in bench/ outside bench/runs/."""
    bench, runs = root / "bench", root / "bench" / "runs"
    results = (root / "docs" / "results.md").read_text()
    cited_by_results = set(CITED.findall(results))
    problems = []
    for f in sorted(p for p in runs.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if f.parent != runs or not RUN_NAME.match(f.name):
            problems.append(f"{rel}: not named bench/runs/DATE_COMMIT7_GPU_what.ext")
        if rel not in cited_by_results:
            problems.append(f"{rel}: not cited by docs/results.md")
    for page in ("docs/results.md", "README.md", "bench/RESULTS.md"):
        problems += [f"{page}: {path} does not exist" for path in sorted(set(CITED.findall((root / page).read_text())))
                     if not (root / path).exists()]
    problems += [f"{f.relative_to(root).as_posix()}: a raw file outside bench/runs/"
                 for f in sorted(bench.rglob("*")) if f.is_file() and f.suffix in RAW and runs not in f.parents]
    return problems


def test_bench_keeps_only_the_raw_files_docs_results_cites():
    problems = raw_file_problems(ROOT)
    assert not problems, "bench/runs/ keeps only what docs/results.md cites, named by date, commit, GPU and " \
        "what:\n" + "\n".join(problems)


def test_the_raw_file_rule_catches_each_kind_of_break(tmp_path):
    for d in ("docs", "bench/runs", "bench/old"):
        (tmp_path / d).mkdir(parents=True)
    kept, uncited, misnamed = "2026-12-02_02979b0_h200_throughput.json", "2026-12-02_02979b0_h200_x.json", "t.json"
    for name in (kept, uncited, misnamed):
        (tmp_path / "bench" / "runs" / name).write_text("{}")
    (tmp_path / "bench" / "old" / "a.csv").write_text("")
    (tmp_path / "docs" / "results.md").write_text(f"`bench/runs/{kept}`, `bench/runs/{misnamed}`, `bench/gone.json`.")
    (tmp_path / "README.md").write_text("see bench/runs/.")
    (tmp_path / "bench" / "RESULTS.md").write_text("`bench/old/b.png`")
    assert raw_file_problems(tmp_path) == [
        f"bench/runs/{uncited}: not cited by docs/results.md",
        f"bench/runs/{misnamed}: not named bench/runs/DATE_COMMIT7_GPU_what.ext",
        "docs/results.md: bench/gone.json does not exist",
        "bench/RESULTS.md: bench/old/b.png does not exist",
        "bench/old/a.csv: a raw file outside bench/runs/"]


# ----- tinygrad3.draw -------------------------------------------------------------------------

def small_graph(shapes=True):
    """y = linear(input, weight) * 2: a Linear and a Mul, two leaves."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((3, 5)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 5)).astype(np.float32), requires_grad=True)
    if shapes:
        with record_shapes():
            y = F.linear(x, w) * 2.0
    else:
        y = F.linear(x, w) * 2.0
    return y, [("input", x), ("weight", w)]


def texts_of(svg_path):
    root = ET.parse(svg_path).getroot()
    return root, [t.text for t in root.iter(SVG + "text")]


def test_draw_labels_functions_leaves_and_saved_arrays(tmp_path):
    y, names = small_graph()
    draw(y, tmp_path / "g.svg", names=names, dot_path=tmp_path / "g.dot")
    root, texts = texts_of(tmp_path / "g.svg")
    for label in ("Linear", "(3, 4) float32", "x2 (3, 5) float32", "w = weight",  # the box of F.linear
                  "Mul", "b () float32",                                           # 2.0 saved for d/dy
                  "input", "(3, 5) float32", "weight", "(4, 5) float32"):          # the leaves
        assert label in texts, label
    assert texts.count("(3, 4) float32") == 2  # both outputs: Linear's and Mul's
    assert len(list(root.iter(SVG + "ellipse"))) == 2 and len(list(root.iter(SVG + "rect"))) == 3  # + background
    assert len([p for p in root.iter(SVG + "path") if p.get("marker-end")]) == 3
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph") and dot.count("->") == 3 and "w = weight" in dot and "shape=ellipse" in dot


def test_draw_puts_inputs_above_the_functions_that_read_them(tmp_path):
    y, names = small_graph()
    draw(y, tmp_path / "g.svg", names=names)
    root, _ = texts_of(tmp_path / "g.svg")
    rows = {t.text: float(t.get("y")) for t in root.iter(SVG + "text")}
    assert rows["input"] < rows["Linear"] < rows["Mul"] and rows["weight"] < rows["Linear"]
    bold = [r for r in root.iter(SVG + "rect") if r.get("stroke-width") == "3"]
    assert len(bold) == 1 and float(bold[0].get("y")) > rows["Linear"]  # the output's box is the Mul


def test_draw_is_deterministic_and_shapes_need_recording(tmp_path):
    for i in range(2):
        y, names = small_graph()
        draw(y, tmp_path / f"{i}.svg", names=names)
    assert (tmp_path / "0.svg").read_text() == (tmp_path / "1.svg").read_text()
    y, names = small_graph(shapes=False)
    assert function_lines(y._creator)[:2] == ["Mul", "float32"]  # no shape noted outside record_shapes


def test_saved_arrays_of_held_functions_are_listed():
    rng = np.random.default_rng(0)
    h, x = (Tensor(rng.standard_normal((2, 8)).astype(np.float32), requires_grad=True) for _ in range(2))
    w = Tensor(np.zeros(8, np.float32), requires_grad=True)
    with record_shapes():
        y = F.rms_norm(x, w, residual=h)
    lines = function_lines(y._creator, {id(w.data): "norm.weight"})
    assert lines[:2] == ["ResidualRMSNorm", "(2, 8) float32"]
    assert lines[2:] == ["norm.rstd (2, 1) float32", "norm.x (2, 8) float32", "norm.w = norm.weight"]


def test_record_shapes_gives_back_the_engine_call_even_on_an_error():
    original = Function.__call__
    with pytest.raises(ValueError), record_shapes():
        F.linear(Tensor(np.ones((2, 3), np.float32), requires_grad=True), Tensor(np.ones((4, 5), np.float32)))
    assert Function.__call__ is original


def test_draw_refuses_a_leaf_and_a_freed_graph(tmp_path):
    y, names = small_graph()
    with pytest.raises(ValueError, match="leaf"):
        draw(names[0][1], tmp_path / "leaf.svg")
    y.backward(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="freed"):
        draw(y, tmp_path / "freed.svg")

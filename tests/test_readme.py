from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    """.ci/run runs the demo command and the test command exactly as the README gives them."""
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("    pip install")
                and line.strip().endswith(("python -m pytest -n auto", "--quick"))]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(command in ci for command in commands)


# -- the repository is self-contained: no pointers outside it, docs links that resolve ----------

import re
import subprocess

# Built from pieces so that this file does not match itself.
_OUTSIDE = re.compile(r"\.\./" + "shared|\\b" + "SP" + r"EC\b")
_DOCS_REFERENCE = re.compile(r"(docs/[\w.-]+\.md)(?:,? sections? (\d+))?")
_SKIPPED_DIRS = {".git", "build", "__pycache__", ".pytest_cache", ".benchmarks", ".hypothesis"}


def _repository_files():
    """The tracked and untracked-but-not-ignored files (what a commit would hold), without any
    virtualenv made inside the checkout (a directory with a pyvenv.cfg, whatever its name: the
    README's setup run from a fresh clone creates one)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode()
        paths = [ROOT / p for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked sdist)
        paths = [p for p in ROOT.rglob("*") if not _SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts)]
    virtualenvs = {venv.parent for venv in ROOT.glob("*/pyvenv.cfg")}
    return [p for p in paths if p.is_file() and not virtualenvs.intersection(p.parents)]


def _text(path):
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary (the built extension) or unreadable


def test_no_file_refers_outside_the_repository():
    hits = []
    for path in _repository_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "references to a file outside the repository (now in docs/):\n" + "\n".join(hits)


def test_readme_docs_links_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme) + re.findall(r"`(docs/[^`#\s]+)`", readme)
    assert links, "README.md links no docs/ file"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README.md links missing files: {missing}"


def test_docs_section_references_resolve():
    """Every 'docs/<file>.md section N' in the repository names an existing file with a '## N.' heading."""
    bad = []
    for path in _repository_files():
        text = _text(path)
        if text is None:
            continue
        for doc, section in _DOCS_REFERENCE.findall(text):
            target = ROOT / doc
            if not target.is_file():
                bad.append(f"{path.relative_to(ROOT)}: {doc} does not exist")
            elif section and not re.search(rf"^## {section}\. ", target.read_text(), re.MULTILINE):
                bad.append(f"{path.relative_to(ROOT)}: {doc} has no section {section}")
    assert not bad, "\n".join(bad)


def test_source_distribution_holds_what_the_build_compiles(tmp_path):
    """`pip install ghostkernels-*.tar.gz` (or `python -m build`, which builds the wheel from the
    sdist) compiles csrc/: every file there must be in the sdist, the headers setup.py does not
    list included (they were missing until MANIFEST.in named them)."""
    import shutil
    import sys
    import tarfile

    # From a copy of the repository's files: in a checkout, the egg-info of an editable install
    # lists the headers, and setuptools would ship them from that list.
    source = tmp_path / "source"
    for path in _repository_files():
        copy = source / path.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    subprocess.run([sys.executable, "-c", "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])",
                    str(tmp_path)], cwd=source, check=True, capture_output=True)
    (sdist,) = tmp_path.glob("ghostkernels-*.tar.gz")
    with tarfile.open(sdist) as archive:
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    needed = {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".h", ".cpp")}
    assert needed <= shipped, f"missing from the sdist: {sorted(needed - shipped)}"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's Python blocks, in order, as a user pastes them: in one namespace, given only
    what their text leaves to the reader (`my_vgg`, `my_resnet50`; the last block's `model` and
    `x`: a model that calls the ops itself)."""
    import torch

    from ghostkernels import accelerate
    from ghostkernels.models import ghostnet_050, plain

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)  # the ONNX files they write
    namespace = {"my_vgg": plain.vgg16_cifar(), "my_resnet50": plain.resnet50()}
    for block in blocks[:3]:
        exec(block, namespace)
    namespace.update(model=accelerate(ghostnet_050(fused=False).eval()), x=torch.randn(1, 3, 64, 64))
    exec(blocks[3], namespace)
    assert (tmp_path / "ghostnet.onnx").is_file() and (tmp_path / "model.onnx").is_file()


def test_example_script_runs():
    import sys

    result = subprocess.run([sys.executable, str(ROOT / "examples" / "accelerate_ghostnet.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "same output" in result.stdout

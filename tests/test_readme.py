"""Every Python code block of README.md runs as written (issue 18).

Each Python block runs in a fresh Python process (``sys.executable`` on a temporary file), in an empty
temporary directory, on the CPU (``CUDA_VISIBLE_DEVICES=""``, ``TRITON_INTERPRET=1``, Hugging Face offline),
with this checkout first on ``PYTHONPATH``; it must exit with status 0. The file holds the block's code at its
README line numbers (blank lines before it), so a traceback's line numbers are README.md's. Tests are named
``README-line-N``, N the line of the block's opening fence (or of an indented block's first line).

Which code blocks are Python (the rule; ``test_every_code_block_is_classified`` fails on any other block):

* Fenced blocks (```` ``` ```` or ``~~~``): by their language tag. ``python``, ``py``, ``python3``, ``pycon`` are
  Python; any other tag (``bash``, ``sh``, ``console``, ``text``, ``yaml``...) is not. An untagged fenced block is
  classified by its content, as an indented block.
* Indented code blocks (CommonMark's: lines indented by 4 or more spaces after a blank line or a heading, outside
  fences; inside a list item, 4 more than the item's content) and untagged fences, by content:

  - shell, when every line that is neither blank nor a ``#`` comment starts with a shell command word of
    ``SHELL_COMMANDS`` (``bash``, ``python3``, ``pip``, ``pytest``, ``torchrun``...) followed by an argument or
    nothing (so ``python3 -m train demo`` is shell and ``python = 3`` is not), optionally after ``VAR=value``
    environment assignments;
  - Python, when it is not shell and either parses as Python (``ast.parse``) or its first line of code starts
    with a Python statement (``import``, ``from``, ``def``, ``class``, ``with``, ``for``, ``if``, ``@``...): a block
    that looks like Python but does not parse is therefore a Python block that fails its test;
  - anything else is unclassified, and fails: give it a language tag (e.g. ```` ```text ````).

Markers: an HTML comment alone on a line, the last non-blank line before the block, changes how a Python block
is tested (``test_every_code_block_is_classified`` fails on an unknown directive, on a marker before a
non-Python block, and on a marker followed by no block)::

    <!-- readme-test: continues -->                 runs after the previous Python block: that block's code (with
                                                    its own continuations) then this one, in one process
    <!-- readme-test: torchrun --nproc_per_node=N -->  a script for torchrun: run as
                                                    ``torchrun --standalone --nproc_per_node=N`` (gloo on the CPU)
    <!-- readme-test: fragment: REASON -->          not runnable on its own (e.g. a line of the user's own
                                                    script): only compiled, so a syntax error still fails

Unmarked Python blocks must run alone. Blocks use small inputs: the whole file takes about half a minute of CPU.
A block that imports one of the optional packages of ``OPTIONAL`` (the ``hf`` extra) is skipped, with its reason,
where that package is not installed; any other missing import fails.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT_S = 300
# Optional dependencies (setup.py's "hf" and "test" extras): a block needing a missing one is skipped.
OPTIONAL = {"transformers", "accelerate", "trl", "datasets", "tokenizers"}
IMPLIED = {"ttm_kernels.integrations.hf": ("transformers", "accelerate")}   # what importing these needs

PYTHON_TAGS = {"python", "py", "python3", "pycon"}
SHELL_COMMANDS = {"bash", "sh", "zsh", "python", "python3", "pip", "pip3", "pytest", "torchrun", "cd", "export",
                  "git", "conda", "uv", "make", "docker", "apt", "apt-get", "sudo", "source", ".", "nvidia-smi",
                  "ls", "cat", "echo", "env", "ninja", "cmake", "mkdir", "rm", "cp", "mv", "tar", "curl", "wget"}
PYTHON_STATEMENT = re.compile(r"^(?:(?:import|from|def|class|with|for|while|if|try|async|return|raise|assert)\b"
                              r"|print\(|@)")
SHELL_LINE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?P<cmd>\S+)(?:\s+[^=\s(]|\s*$)")

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)")
MARKER = re.compile(r"^ {0,3}<!--\s*readme-test:\s*(?P<directive>.*?)\s*-->\s*$")
LIST_ITEM = re.compile(r"^(?P<lead> {0,3}(?:[-+*]|\d{1,9}[.)]))(?P<gap> {1,4}|$)")
HEADING = re.compile(r"^ {0,3}#{1,6}(\s|$)")
TORCHRUN = re.compile(r"^torchrun --nproc_per_node=(?P<n>[1-9]\d*)$")


@dataclass
class Block:
    line: int                 # 1-based README line of the opening fence, or of an indented block's first line
    first_code_line: int      # 1-based README line of the code's first line
    fenced: bool
    tag: str                  # a fenced block's language tag ("" if none or indented)
    code: str
    marker: Optional[str] = None   # the readme-test directive before it
    kind: Optional[str] = None     # "python", "other" or None (unclassified)


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse_markdown(text: str):
    """(code blocks, problems): fenced and indented code blocks with the readme-test markers before them."""
    lines = text.split("\n")
    blocks: List[Block] = []
    problems: List[str] = []
    pending = None            # (line, directive) of a marker waiting for its block
    prev = "blank"            # what the previous line was: "blank", "heading", "html", "fence" or "text"
    list_indent = None        # content indent of the list item we are in, None outside lists
    i = 0

    def take_marker():
        nonlocal pending
        directive = None if pending is None else pending[1]
        pending = None
        return directive

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            prev = "blank"
            i += 1
            continue
        fence = FENCE.match(line)
        marker = MARKER.match(line)
        code_indent = 4 + (list_indent or 0)
        if fence and indent_of(line) < code_indent:
            char, length, strip = fence["fence"][0], len(fence["fence"]), len(fence["indent"])
            close = re.compile(rf"^ {{0,3}}{re.escape(char)}{{{length},}}\s*$")
            j = i + 1
            body = []
            while j < len(lines) and not close.match(lines[j]):
                body.append(lines[j][min(strip, indent_of(lines[j])):])
                j += 1
            blocks.append(Block(i + 1, i + 2, True, fence["info"].lower(), "\n".join(body) + "\n",
                                take_marker()))
            prev = "fence"
            i = j + 1
            continue
        if indent_of(line) >= code_indent and prev in ("blank", "heading", "html", "fence"):
            j = i
            body = []
            while j < len(lines) and (not lines[j].strip() or indent_of(lines[j]) >= code_indent):
                body.append(lines[j][code_indent:])
                j += 1
            while body and not body[-1].strip():
                body.pop()
            blocks.append(Block(i + 1, i + 1, False, "", "\n".join(body) + "\n", take_marker()))
            prev = "text"
            i += len(body)
            continue
        if pending is not None:
            problems.append(f"README.md:{pending[0]}: the marker <!-- readme-test: {pending[1]} --> is not followed "
                            "by a code block (only blank lines may lie between them)")
            pending = None
        if marker:
            pending = (i + 1, marker["directive"])
            prev = "html"
            i += 1
            continue
        item = LIST_ITEM.match(line)
        if item:
            list_indent = len(item["lead"]) + max(1, len(item["gap"]))
        elif list_indent is not None and prev == "blank" and indent_of(line) < list_indent:
            list_indent = None    # a paragraph after the list: the list has ended
        comment = line.lstrip().startswith("<!--") and line.rstrip().endswith("-->")   # a one-line HTML block
        prev = "heading" if HEADING.match(line) else ("html" if comment else "text")
        i += 1
    if pending is not None:
        problems.append(f"README.md:{pending[0]}: the marker <!-- readme-test: {pending[1]} --> is not followed by "
                        "a code block")
    return blocks, problems


def is_shell(code: str) -> bool:
    lines = [ln.strip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        return False
    for ln in lines:
        m = SHELL_LINE.match(ln)
        if not m or m["cmd"] not in SHELL_COMMANDS:
            return False
    return True


def looks_like_python(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except SyntaxError:
        pass
    first = next((ln.strip() for ln in code.splitlines() if ln.strip() and not ln.strip().startswith("#")), "")
    return bool(PYTHON_STATEMENT.match(first))


def classify(block: Block) -> Optional[str]:
    if block.fenced and block.tag:
        return "python" if block.tag in PYTHON_TAGS else "other"
    if is_shell(block.code):
        return "other"
    if looks_like_python(block.code):
        return "python"
    return None


def directive_kind(directive: Optional[str]):
    """("run" | "continues" | "torchrun" | "fragment" | None for an unknown directive, its argument)."""
    if directive is None:
        return "run", None
    if directive == "continues":
        return "continues", None
    m = TORCHRUN.match(directive)
    if m:
        return "torchrun", int(m["n"])
    if directive.startswith("fragment:") and directive[len("fragment:"):].strip():
        return "fragment", directive[len("fragment:"):].strip()
    return None, None


def padded(parts) -> str:
    """The blocks' code at their README line numbers: line k of the result is README line k."""
    out, line = [], 1
    for block in parts:
        out.append("\n" * (block.first_code_line - line))
        out.append(block.code)
        line = block.first_code_line + block.code.count("\n")
    return "".join(out)


@dataclass
class Case:
    block: Block
    how: str                  # "run", "torchrun" or "fragment"
    source: str               # the code to run or compile (continuations included), at README line numbers
    nproc: int = 0
    why: str = ""


def readme_cases():
    """(cases, problems): one case per Python block of the README."""
    with open(README, encoding="utf-8") as f:
        blocks, problems = parse_markdown(f.read())
    cases: List[Case] = []
    chain: List[Block] = []   # the previous Python block and the blocks it continues
    previous: Optional[Case] = None
    for block in blocks:
        block.kind = classify(block)
        where = f"README.md:{block.line}"
        if block.kind is None:
            problems.append(f"{where}: an unclassified code block (neither shell nor Python by the rule of "
                            f"tests/test_readme.py): give it a language tag, e.g. ```text\n{block.code[:200]}")
            continue
        how, arg = directive_kind(block.marker)
        if how is None:
            problems.append(f"{where}: unknown marker <!-- readme-test: {block.marker} --> (known: continues, "
                            "torchrun --nproc_per_node=N, fragment: REASON)")
            continue
        if block.kind != "python":
            if block.marker is not None:
                problems.append(f"{where}: a readme-test marker before a block that is not Python")
            continue
        if how == "continues":
            if previous is None:
                problems.append(f"{where}: 'continues' on the README's first Python block")
                continue
            chain = chain + [block]
            how, arg = previous.how, (previous.nproc if previous.how == "torchrun" else previous.why)
        else:
            chain = [block]
        case = Case(block, how, padded(chain))
        if how == "torchrun":
            case.nproc = arg
        elif how == "fragment":
            case.why = arg
        cases.append(case)
        previous = case
    return cases, problems


CASES, PROBLEMS = readme_cases()


def test_every_code_block_is_classified():
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert CASES, "no Python block found in README.md"
    assert any(c.how == "run" for c in CASES)


def test_parser_agrees_with_commonmark():
    """The code blocks found here are the ones a CommonMark parser finds (when markdown-it-py is installed)."""
    markdown_it = pytest.importorskip("markdown_it")
    with open(README, encoding="utf-8") as f:
        text = f.read()
    tokens = markdown_it.MarkdownIt("commonmark").parse(text)
    theirs = sorted((t.map[0] + 1, t.type == "fence") for t in tokens if t.type in ("fence", "code_block"))
    ours = sorted((b.line, b.fenced) for b in parse_markdown(text)[0])
    assert ours == theirs


def test_classification_rule():
    def kind(code, tag="", fenced=False):
        return classify(Block(1, 1, fenced, tag, code))

    assert kind("bash scripts/bootstrap.sh && python3 -m train demo\n") == "other"
    assert kind("python3 -m train --config a.yaml   # comment\npytest benchmarks/ --benchmark-only\n") == "other"
    assert kind("TRITON_INTERPRET=1 python3 -m pytest tests\n") == "other"
    assert kind("from ttm_kernels import fused_wttm_loss\nloss = fused_wttm_loss(z, v)\n") == "python"
    assert kind("python = 3\n") == "python"
    assert kind("import torch\nloss = f(x\n") == "python"          # broken Python is still Python: its test fails
    assert kind("loss = f(x\n") is None                             # neither: unclassified, fails
    assert kind("| a | b |\n") is None
    assert kind('print("a"\n') == "python"
    assert kind("anything", tag="python", fenced=True) == "python"
    assert kind("import torch\n", tag="text", fenced=True) == "other"
    blocks, problems = parse_markdown("text\n\n<!-- readme-test: continues -->\n```python\nx = 1\n```\n\n"
                                      "- item\n\n      y = 2\n\n<!-- readme-test: fragment: why -->\ntext\n")
    assert [(b.line, b.fenced, b.marker, b.code) for b in blocks] == [(4, True, "continues", "x = 1\n"),
                                                                      (10, False, None, "y = 2\n")]
    assert len(problems) == 1 and "README.md:12" in problems[0]


def imported_modules(tree):
    """The top-level packages a block imports, and the optional ones that its imports need (``IMPLIED``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    tops = {name.split(".")[0] for name in names}
    return tops.union(*(IMPLIED.get(name, ()) for name in names))


def test_optional_imports_are_found():
    tree = ast.parse("import torch, trl\nfrom ttm_kernels.integrations.hf import DistillationTrainer\n"
                     "from datasets import Dataset\nfrom . import x\n")
    assert imported_modules(tree) == {"torch", "trl", "ttm_kernels", "transformers", "accelerate", "datasets"}


def subprocess_env(tmp_path):
    env = dict(os.environ)
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p]))
    return env


@pytest.mark.parametrize("case", CASES, ids=[f"README-line-{c.block.line}" for c in CASES])
def test_readme_python_block(case, tmp_path):
    tree = compile(case.source, "README.md", "exec", ast.PyCF_ONLY_AST)   # a syntax error fails every block
    if case.how == "fragment":
        return
    missing = sorted(m for m in imported_modules(tree) if m in OPTIONAL and importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install -e \".[hf]\")")
    work = tmp_path / "cwd"
    work.mkdir()
    script = tmp_path / f"README-line-{case.block.line}.py"
    script.write_text(case.source, encoding="utf-8")
    if case.how == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.nproc}",
               str(script)]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=work, env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, (
        f"README.md block at line {case.block.line} ({case.how}) exited with {proc.returncode}; the traceback's "
        f"line numbers are README.md's\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")

"""A strict unified-diff applier (no fuzz): a hunk applies only where its context matches
exactly, so a patch written for another upstream version fails loudly, naming file and hunk."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from harness.core.errors import UserError

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class FilePatch:
    old: str | None  # None: file created
    new: str | None  # None: file deleted
    hunks: list[tuple[str, list[str]]] = field(default_factory=list)  # (header, lines with prefix)


def _strip(path: str) -> str | None:
    path = path.split("\t")[0].strip()
    if path == "/dev/null":
        return None
    return path[2:] if path[:2] in ("a/", "b/") else path


def parse(text: str, where: str) -> list[FilePatch]:
    lines = text.splitlines(keepends=True)
    out: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            fp = FilePatch(_strip(lines[i][4:]), _strip(lines[i + 1][4:]))
            out.append(fp)
            i += 2
            continue
        m = _HUNK.match(lines[i])
        if m:
            if not out:
                raise UserError(f"{where}: hunk before any file header")
            old_n = int(m.group(2) or 1)
            new_n = int(m.group(4) or 1)
            body: list[str] = []
            i += 1
            while (old_n > 0 or new_n > 0) and i < len(lines):
                ln = lines[i]
                if ln.startswith("\\"):
                    i += 1
                    continue
                tag = ln[:1] if ln[:1] in " +-" else " "
                if ln in ("\n", "\r\n"):
                    ln = " " + ln  # some editors strip the space of blank context lines
                if tag in " -":
                    old_n -= 1
                if tag in " +":
                    new_n -= 1
                body.append(ln)
                i += 1
            if old_n or new_n:
                raise UserError(f"{where}: hunk {m.group(0)} is truncated")
            out[-1].hunks.append((m.group(0), body))
            continue
        i += 1
    if not out:
        raise UserError(f"{where}: no file changes found in this diff")
    return out


def apply(diff_path: Path, root: Path, log: list[str]) -> None:
    """Apply one diff to the tree at `root`; all-or-nothing per file set."""
    patches = parse(diff_path.read_text(), str(diff_path))
    results: dict[Path, str | None] = {}
    for fp in patches:
        rel = fp.new if fp.old is None else fp.old
        target = root / rel  # type: ignore[operator]
        if fp.old is None:
            if target.exists():
                raise UserError(f"{diff_path.name}: creates {rel}, which already exists")
            src: list[str] = []
        else:
            if not target.is_file():
                raise UserError(f"{diff_path.name}: file {rel} not found in the upstream tree")
            src = target.read_text().splitlines(keepends=True)
        pos = 0
        for k, (header, body) in enumerate(fp.hunks, 1):
            old = [ln[1:] for ln in body if ln[:1] in " -"]
            new = [ln[1:] for ln in body if ln[:1] in " +"]
            start = int(_HUNK.match(header).group(1)) - 1  # type: ignore[union-attr]
            start = max(start if old else start + 1, 0)
            at = _find(src, old, max(start, pos), pos)
            if at is None:
                raise UserError(f"{diff_path.name}: hunk #{k} {header} does not apply to {rel}")
            src[at:at + len(old)] = new
            pos = at + len(new)
        results[root / (fp.new or fp.old)] = None if fp.new is None else "".join(src)  # type: ignore[operator]
        if fp.new is None and fp.old is not None:
            results[root / fp.old] = None
    for path, content in results.items():  # write only after every hunk matched
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    log.append(f"applied {diff_path.name}: " + ", ".join(str(p.relative_to(root)) for p in results))


def _find(src: list[str], old: list[str], hint: int, lo: int) -> int | None:
    """Exact match of `old` in src[lo:], nearest to `hint` first."""
    n = len(old)
    if n == 0:
        return min(hint, len(src))
    candidates = range(lo, len(src) - n + 1)
    for at in sorted(candidates, key=lambda a: abs(a - hint)):
        if src[at:at + n] == old:
            return at
    return None

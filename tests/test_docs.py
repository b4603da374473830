"""The front page and docs/: links that resolve, the README's size, and its two commands first.

Every relative link in README.md and docs/*.md must point at an existing file or folder of the
repository, and a link with #anchor into a markdown file (or into its own page) at a heading of that
file, slugged as GitHub does. Absolute http(s) and mailto links are not checked (no network).
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_BYTES = 12 * 1024
FIRST_COMMANDS = ["bash launch/quickstart.sh", "bash launch/test.sh"]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(?:.+?)\1")
# [text](target "title") and ![alt](target); the target may be <...>
INLINE_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(].*?[\"')])?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, ...


def docs_pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def _closes(match, line: str, fence: str) -> bool:
    """A closing fence: the opening one's character, at least as long, and nothing after it."""
    return bool(match) and match.group(1).startswith(fence) and not line[match.end() :].strip()


def split_fences(text: str):
    """(line number, line, block index or None): which fenced code block each line is in. An opening
    fence gives (number, None, its block index); a closing fence gives nothing."""
    fence, block = None, -1
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, block = match.group(1), block + 1
            yield number, None, block
        elif fence is not None and _closes(match, line, fence):
            fence = None
        else:
            yield number, line, (block if fence is not None else None)


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    for number, line, block in split_fences(text):
        if block is None and line is not None:
            yield number, line


def code_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks' lines, in order."""
    blocks: list[list[str]] = []
    for _, line, block in split_fences(text):
        if line is None:
            blocks.append([])
        elif block is not None:
            blocks[block].append(line)
    return blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text without markup, lowercased, punctuation removed
    (letters, digits, '_', '-' and spaces stay), spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = ATX_HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2).strip())
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(text: str):
    """(line number, target) of every inline link, image and reference definition outside code."""
    for number, line in prose_lines(text):
        line = INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        definition = REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
        for target in targets:
            yield number, target.strip("<>")


def broken_links(page: Path, repo: Path = REPO) -> list[str]:
    """What is wrong with the relative links of one markdown page, one line per link."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue  # http(s), mailto: not checked here
        where = f"{page.relative_to(repo)}:{number}: {target}"
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if path_part.startswith("/"):
            destination = (repo / path_part.lstrip("/")).resolve()
        if not destination.exists():
            problems.append(f"{where}: no such file")
            continue
        if repo.resolve() not in destination.parents and destination != repo.resolve():
            problems.append(f"{where}: points outside the repository")
            continue
        if anchor and destination.suffix == ".md":
            if anchor not in anchors(destination):
                problems.append(f"{where}: no heading #{anchor} in {destination.relative_to(repo.resolve())}")
    return problems


def test_relative_links_resolve():
    pages = docs_pages()
    assert len(pages) > 1, "docs/*.md is missing"
    problems = [problem for page in pages for problem in broken_links(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move text to docs/"


def test_readme_starts_with_the_two_commands():
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no code block"
    commands = [line.split("#", 1)[0].strip() for line in blocks[0]]
    assert [c for c in commands if c] == FIRST_COMMANDS
    for command in FIRST_COMMANDS:
        assert (REPO / command.split()[-1]).is_file(), command


def test_the_checker_finds_broken_links(tmp_path):
    """The link check itself can fail: a missing file, a missing heading, a bad same-page anchor."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Shards, sources (and `keys`)\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Front\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#shards-sources-and-keys) [ok](#front) "
        "[web](https://example.com/nowhere)\n"
        "[gone](docs/missing.md) [no heading](docs/page.md#sources) [self](#back)\n"
        "```\n[in code](docs/not-checked.md)\n```\n"
        "`[inline code](docs/not-checked-either.md)`\n"
    )
    problems = broken_links(readme, repo=tmp_path)
    assert len(problems) == 3, problems
    assert "docs/missing.md: no such file" in problems[0]
    assert "no heading #sources" in problems[1]
    assert "no heading #back" in problems[2]


def test_github_slugs():
    assert github_slug("Contrastive loss at scale (`python benchmarks/loss.py`)") == (
        "contrastive-loss-at-scale-python-benchmarkslosspy"
    )
    measured = "measured-the-tux-paint-domain-2026-11-25"
    assert github_slug("Measured: the Tux Paint domain, 2026-11-25") == measured
    assert github_slug("Import layers") == "import-layers"

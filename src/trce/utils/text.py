"""Text with a marked slot: a prompt or caption is written with its slot between `START` and `END`, and
`assemble` collapses its whitespace and returns the slot's character span (concept templates, ShapeWorld's
grammar and its open language all write prompts this way; `trce.tokens.token_span` maps the span to tokens).
"""

from __future__ import annotations

import re

START, END = "\x01", "\x02"  # mark the slot while a prompt is assembled


def assemble(marked: str) -> tuple[str, tuple[int, int]]:
    """`... \\x01slot\\x02 ...` -> (text with whitespace collapsed, span of the slot)."""
    pre, rest = marked.split(START, 1)
    mid, post = rest.split(END, 1)
    pre = re.sub(r"\s+", " ", pre).lstrip()
    post = re.sub(r"\s+", " ", post).rstrip()
    mid = re.sub(r"\s+", " ", mid).strip()
    if not mid:
        pre, post = pre.rstrip(), post.lstrip()
        sep = " " if pre and post and not post.startswith((",", ".")) else ""
        return pre + sep + post, (len(pre), len(pre))
    if pre and not pre.endswith(" "):
        pre += " " if pre[-1].isalnum() and mid[0].isalnum() else ""
    return pre + mid + post, (len(pre), len(pre) + len(mid))

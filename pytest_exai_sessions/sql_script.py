"""Split a PostgreSQL script, such as a migration file, into its statements the way psql does.

Sent as one query, a whole file fails as one: the error names a character position in a text of
hundreds of lines, if it names one at all. Run one statement at a time (the migration runner does
so with a file that failed), and each :class:`Statement` knows where it starts in the file, so the
error's position becomes a file line.

The lexer knows only what decides where a statement ends, as psql's does: quotes, comments, dollar
quotes, parentheses and the BEGIN ... END of SQL-standard function bodies. It checks no syntax;
whatever is wrong is left for the server to report.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

_BLANKS = " \t\n\r\f\v"  # PostgreSQL's whitespace; any other character (even U+00A0) is significant
# Identifiers: PostgreSQL counts every non-ASCII character as a letter, and lets '$' continue a name.
_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_COMMENT_MARK = re.compile(r"/\*|\*/")


@dataclass(frozen=True)
class Statement:
    text: str  # from its first significant character to its ';' (or to the end of the script)
    offset: int  # 0-based character offset of text[0] in the script
    line: int  # 1-based line number of text[0] in the script

    def line_at(self, position: int) -> int:
        """The script line of a 1-based character position within ``text``.

        PostgreSQL's error position counts like this, in characters; a position past either end
        gives the first or the last line.
        """
        return self.line + self.text.count("\n", 0, max(position - 1, 0))


def split_statements(script: str) -> list[Statement]:
    """The statements of ``script`` in order, without the blanks and comments between them.

    A ';' ends a statement unless it is inside a string, quoted identifier, dollar quote, comment,
    parentheses, or the BEGIN ... END body of a CREATE FUNCTION or PROCEDURE. Something left open at
    the end (a quote, a comment) makes the rest of the script the last statement, for the server to
    reject: skipping it would silently drop whatever it swallowed. Blanks and comments alone are no
    statement; a lone ';' is one (empty) statement, as psql sends it too.
    """
    statements = []
    line, counted = 1, 0  # line number at offset `counted`, advanced incrementally
    for start, end in _spans(script):
        line += script.count("\n", counted, start)
        counted = start
        statements.append(Statement(script[start:end], start, line))
    return statements


def _spans(script: str) -> Iterator[tuple[int, int]]:
    """(start, end) of every statement: the one scanning loop."""
    start: int | None = None  # offset of the current statement's first significant character
    words: list[str] = []  # its first words, lowercased, to recognise CREATE [OR REPLACE] FUNCTION
    parens = blocks = 0  # depth of parentheses, of BEGIN/CASE ... END in a function body
    i = 0
    while i < len(script):
        char = script[i]
        if char in _BLANKS:
            i += 1
            continue
        if script.startswith("--", i):
            i = _line_end(script, i)
            continue
        if script.startswith("/*", i):
            end = _comment_end(script, i)
            if end is None:
                start = i if start is None else start
                break
            i = end
            continue
        if start is None:
            start, words, parens, blocks = i, [], 0, 0
        if char == ";" and parens == 0 and blocks == 0:
            yield start, i + 1
            start = None
            i += 1
        elif char in "'\"":
            i = _quoted_end(script, i + 1, char)
        elif (tag := _DOLLAR_TAG.match(script, i)) is not None:
            i = _dollar_quoted_end(script, tag.end(), tag.group())
        elif (word := _WORD.match(script, i)) is not None:
            i = word.end()
            if word.group() in ("E", "e") and script.startswith("'", i):
                i = _escaped_end(script, i + 1)
            else:
                blocks = _count_word(words, word.group().lower(), parens, blocks)
        else:
            # Anything else is one character: an operator, a digit, the '$' of a parameter such as $1.
            # U&'...', B'...', X'...' and N'...' need nothing special: the quote after the prefix
            # starts an ordinary string.
            if char == "(":
                parens += 1
            elif char == ")" and parens:
                parens -= 1
            i += 1
    if start is not None:
        yield start, len(script)


def _count_word(words: list[str], word: str, parens: int, blocks: int) -> int:
    """The new BEGIN ... END depth after ``word``, which is only counted in a function body, as psql does.

    In CREATE FUNCTION ... BEGIN ATOMIC ... END the ';' of the body's statements do not end the
    CREATE; CASE ... END inside such a body nests too. Elsewhere BEGIN is a statement of its own.
    """
    if len(words) < 4:
        words.append(word)
    if parens or not _starts_routine(words):
        return blocks
    if word == "begin" or (word == "case" and blocks):
        return blocks + 1
    if word == "end" and blocks:
        return blocks - 1
    return blocks


def _starts_routine(words: list[str]) -> bool:
    """Whether a statement's first words are CREATE [OR REPLACE] FUNCTION or PROCEDURE."""
    kind = words[3:4] if words[1:3] == ["or", "replace"] else words[1:2]
    return words[:1] == ["create"] and kind in (["function"], ["procedure"])


def _line_end(script: str, i: int) -> int:
    """The end of a ``--`` comment: just after its newline, or the end of the script."""
    newline = script.find("\n", i)
    return len(script) if newline < 0 else newline + 1


def _comment_end(script: str, i: int) -> int | None:
    """The end of the ``/* */`` comment at ``i`` (they nest in PostgreSQL), or None if unterminated."""
    depth = 0
    for mark in _COMMENT_MARK.finditer(script, i):
        depth += 1 if mark.group() == "/*" else -1
        if depth == 0:
            return mark.end()
    return None


def _quoted_end(script: str, i: int, quote: str) -> int:
    """The end of a '...' string or "..." identifier whose body starts at ``i``; a doubled quote is part of it."""
    while (close := script.find(quote, i)) >= 0:
        if not script.startswith(quote, close + 1):
            return close + 1
        i = close + 2
    return len(script)


def _escaped_end(script: str, i: int) -> int:
    """The end of an E'...' string whose body starts at ``i``: a backslash escapes the next character."""
    while i < len(script):
        if script[i] == "\\":
            i += 2
        elif script[i] == "'":
            if not script.startswith("'", i + 1):
                return i + 1
            i += 2
        else:
            i += 1
    return len(script)


def _dollar_quoted_end(script: str, i: int, tag: str) -> int:
    """The end of a dollar quote opened by ``tag`` (``$$`` or ``$name$``) whose body starts at ``i``."""
    close = script.find(tag, i)
    return len(script) if close < 0 else close + len(tag)

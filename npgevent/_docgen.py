"""Generate ``docs/settings.md`` and ``etc/npgevent.conf`` from the settings table.

``python -m npgevent._docgen`` rewrites both files; the test suite checks that
they match what this module generates, so the docs cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .settings import SETTINGS, Setting

ROOT = Path(__file__).resolve().parent.parent


def _roles(s: Setting) -> str:
    return ", ".join(s.roles)


def settings_markdown() -> str:
    out = [
        "# Settings reference",
        "",
        "Generated from `npgevent/settings.py` by `python -m npgevent._docgen`; do not edit by hand.",
        "",
        "Every option can be set, from lowest to highest precedence, by its default, a config file",
        "(`-c FILE`, or `/etc/npgevent.conf`, `~/.config/npgevent.conf`: `key = value` lines), its",
        "`NP_*` environment variable, its CLI flag, and, for the NodePass URL parameters, the URL's",
        "query (`?min=32&read=30s`), which overrides everything for that instance.",
        "",
        "Durations use Go syntax (`500ms`, `30s`, `1h30m`). A value that cannot be parsed or is not",
        "one of the allowed choices stops start-up with a one-line error (exit status 2); a value that",
        "parses but is out of range keeps Go NodePass's default and is logged at WARN.",
        "",
        "## NodePass URL parameters",
        "",
        "| URL key | env | CLI flag / config key | default | applies to | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        if s.query:
            out.append("| `%s` | `%s` | `%s` / `%s` | `%s` | %s | %s |" % (
                s.query, s.env, s.flag, s.config_key, s.fmt(s.default), _roles(s), _help(s)))
    for title, go in (("Tunables (`NP_*` variables of Go NodePass)", True),
                      ("npgevent's own options (no Go equivalent)", False)):
        out += [
            "",
            "## " + title,
            "",
            "| env | CLI flag / config key | default | meaning |",
            "|---|---|---|---|",
        ]
        for s in SETTINGS:
            if not s.query and s.go == go:
                out.append("| `%s` | `%s` / `%s` | `%s` | %s |" % (
                    s.env, s.flag, s.config_key, s.fmt(s.default) or "", _help(s)))
    out += [
        "",
        "## Other options",
        "",
        "| env | CLI flag / config key | meaning |",
        "|---|---|---|",
        "| `NP_URL` | `--url` / `url` | the NodePass URL when it is not the positional argument |",
        "| | `-c`, `--config` | config file to read |",
        "",
    ]
    return "\n".join(out)


def _help(s: Setting) -> str:
    text = s.help
    if s.range_help:
        text += " (%s, else the default is kept with a warning)" % s.range_help
    return text


def sample_config() -> str:
    out = [
        "# npgevent sample configuration (configargparse format: key = value).",
        "#",
        "# Keys are the long CLI option names. Precedence, lowest to highest: this file,",
        "# NP_* environment variables, CLI flags, then the NodePass URL's own query parameters.",
        "# Generated from npgevent/settings.py by `python -m npgevent._docgen`.",
        "",
        "# The NodePass URL to run (or give it as the command's argument).",
        "url = client://127.0.0.1:8080/127.0.0.1:9000",
        "",
        "# --- NodePass URL parameters (defaults shown; a URL query value overrides them) ---",
    ]
    for s in SETTINGS:
        if s.query:
            out.append("# %s: %s" % (s.config_key, s.help))
            out.append("# %s = %s" % (s.config_key, s.fmt(s.default)))
    out += ["", "# --- Tunables (Go NodePass NP_* variables) ---"]
    for s in SETTINGS:
        if not s.query:
            out.append("# %s (%s): %s" % (s.config_key, s.env, s.help))
            out.append("# %s = %s" % (s.config_key, s.fmt(s.default)))
    out.append("")
    return "\n".join(out)


TARGETS = {
    ROOT / "docs" / "settings.md": settings_markdown,
    ROOT / "etc" / "npgevent.conf": sample_config,
}


def main() -> int:
    for path, build in TARGETS.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(build())
        print("wrote", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

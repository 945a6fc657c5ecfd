"""`--help` that shows each option's default: argparse's own ArgumentDefaultsHelpFormatter adds "(default: None)" and
"(default: False)" to every flag and switch, which says nothing; this one shows only defaults worth reading, and
none where the help text already states it."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        worth = action.default not in (None, False, [], argparse.SUPPRESS) and action.option_strings
        if text and worth and "default" not in text:
            text += " (default: %(default)s)"
        return text

"""What the entry points share on the command line: splitting it into our flags, config overrides and Beam's
flags; logging; the versions a run records. The output folder is ``pipelines.folder``'s."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import platform
import re
from importlib import metadata
from typing import Optional, Sequence

from apache_beam.options import pipeline_options

from configs import schema
from pipelines import drop_warning, runners

OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every pipeline option Beam knows (as ``PipelineOptions.get_all_options`` builds it)."""
    parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in pipeline_options.PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def split_argv(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(our flags, OmegaConf dotted overrides, Beam's pipeline flags) from one command line.

    A flag that is neither ours nor Beam's, and a word that is not a flag's value nor a ``key=value``
    override, fail here, before any work (Beam itself would only warn and drop them): ``--ouput DIR`` or
    ``stages.0.threshold:0.5`` must not run a job with the defaults."""
    args, rest = parser.parse_known_args(argv)
    beam = _beam_parser()
    _, unknown = beam.parse_known_args(rest)
    known = [o for p in (parser, beam) for a in p._actions for o in a.option_strings]
    overrides, problems = [], []
    for word in unknown:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
            problems.append(f"{word}: unknown flag" + (f" (did you mean {close[0]}?)" if close else ""))
        elif OVERRIDE.match(word):
            overrides.append(word)
        else:
            problems.append(f"{word}: neither a flag nor a key=value override")
    if problems:
        parser.error("\n  ".join(["refused before any work:", *problems]))
    beam_args = list(rest)
    for word in overrides:
        del beam_args[len(beam_args) - 1 - beam_args[::-1].index(word)]
    return args, overrides, beam_args


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cascade").setLevel(logging.INFO)
    drop_warning(runners.FN_RUNNER_LOGGER, runners.IN_MEMORY_WORKERS_WARNING)


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def profiles_epilog() -> str:
    """The profiles in configs/, each with the first line of its comment, for --help."""
    lines = ["profiles (--config NAME; configs/NAME.yaml):"]
    for name in sorted(f[:-5] for f in os.listdir(schema.CONFIG_DIR) if f.endswith(".yaml")):
        with open(os.path.join(schema.CONFIG_DIR, f"{name}.yaml")) as fh:
            first = fh.readline().strip()
        about = re.split(r"\. | \(|: ", first.lstrip("# ").strip())[0] if first.startswith("#") else ""
        if len(about) > 80:
            about = about[:80].rsplit(" ", 1)[0] + " ..."
        lines.append(f"  {name:<28} {about}".rstrip())
    return "\n".join(lines)

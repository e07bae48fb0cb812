"""The languages a submission may be written in, beside Python (the default).

One entry per language: the name (SandboxFusion's where it has one) and its aliases, the source
file the submission is written to, the compile command (none for interpreted languages), the run
command, the Debian packages of its toolchain, and the host programs the Jupyter backend needs
(it binds the host's /usr read-only into its sandboxes). Commands are argv lists; `{dir}` stands
for the folder holding the source and what the compiler made of it. The grader
(`inside/grader.py`) and `/run_code` (`inside/run_code.py`) get the commands in their job, so the
code that runs inside a sandbox knows no language by name.

Docker runs a language in its own image, `sandbox-env/<name>:<version>`: the Python image (the
grader and /run_code's program are Python) plus the packages, built offline by
`sandbox-env images build --language <name>` (`kernels/docker/images.py`). A language without
packages (Bash: Debian's base has it) runs in the Python image itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sandbox_env._version import __version__
from sandbox_env.errors import LanguageUnavailableError

DEFAULT = "python"
COMPILE_TIMEOUT_S = 10.0  # SandboxFusion's default `compile_timeout`


@dataclasses.dataclass(frozen=True)
class Language:
    name: str
    source: str  # the file the submission is written to, in {dir}
    run: tuple[str, ...]
    compile: tuple[str, ...] = ()  # empty: interpreted
    packages: tuple[str, ...] = ()  # Debian packages beyond the Python image's
    binaries: tuple[str, ...] = ()  # host programs (on PATH /usr/bin:/bin) the Jupyter backend needs
    aliases: tuple[str, ...] = ()

    @property
    def compiled(self) -> bool:
        return bool(self.compile)

    def image(self, version: str = __version__) -> str:
        """The Docker image this language runs in."""
        return f"sandbox-env/{self.name if self.packages else 'python'}:{version}"

    @property
    def build_command(self) -> str:
        return f"sandbox-env images build --language {self.name}"

    @property
    def apt_command(self) -> str:
        return f"apt-get install {' '.join(self.packages)}"

    def job(self, compile_timeout_s: float) -> dict[str, Any]:
        """What the programs inside the sandbox are told: files and commands, no names."""
        return {"name": self.name, "source": self.source, "compile": list(self.compile), "run": list(self.run),
                "compile_timeout_s": compile_timeout_s}


LANGUAGES: dict[str, Language] = {lang.name: lang for lang in (
    Language("python", "main.py", ("python3", "{dir}/main.py"), aliases=("python3", "py")),
    Language("c", "main.c", ("{dir}/main",),
             compile=("gcc", "-O2", "-std=gnu17", "-pipe", "-o", "{dir}/main", "{dir}/main.c", "-lm"),
             packages=("gcc", "libc6-dev"), binaries=("gcc", "as", "ld")),
    Language("cpp", "main.cpp", ("{dir}/main",),
             compile=("g++", "-O2", "-std=gnu++17", "-pipe", "-o", "{dir}/main", "{dir}/main.cpp"),
             packages=("g++",), binaries=("g++", "as", "ld"), aliases=("c++", "cxx")),
    Language("nodejs", "main.js", ("node", "{dir}/main.js"), packages=("nodejs",), binaries=("node",),
             aliases=("javascript", "js", "node")),
    Language("bash", "main.sh", ("bash", "{dir}/main.sh"), binaries=("bash",), aliases=("sh", "shell")),
    Language("rust", "main.rs", ("{dir}/main",),
             compile=("rustc", "-O", "-o", "{dir}/main", "{dir}/main.rs"),
             packages=("rustc",), binaries=("rustc", "cc"), aliases=("rs",)),
)}
_ALIASES = {alias: lang for lang in LANGUAGES.values() for alias in (lang.name, *lang.aliases)}


def names() -> list[str]:
    return list(LANGUAGES)


def canonical(name: str | None) -> str:
    """The registry's name for `name` or one of its aliases (case-insensitive); None: Python."""
    return get(name).name


def get(name: str | None) -> Language:
    if name is None:
        return LANGUAGES[DEFAULT]
    lang = _ALIASES.get(name.lower())
    if lang is None:
        raise LanguageUnavailableError(f"unknown language {name[:50]!r}: sandbox-env runs "
                                       f"{', '.join(LANGUAGES)}", language=name[:50])
    return lang

"""Write a pretraining corpus of Python standard-library docstrings as jsonl (``{"text": ...}``).

The modules are a fixed, sorted list; every module, and the public classes, functions and methods
it defines itself, contribute their ``__doc__`` (``inspect.getdoc``: dedented). Modules missing on
this interpreter are skipped, so the corpus depends only on the Python version.

    python corpus.py OUT.jsonl
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys

MODULES = sorted((
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "email.message", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache",
    "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "numbers", "operator", "optparse",
    "os", "os.path", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue",
    "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "signal", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
))  # fmt: skip


def _members(module, prefix: str) -> list[tuple[str, object]]:
    """(``prefix.name``, object) of the module's own public classes, functions and methods, sorted."""
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            out.append((f"{prefix}.{name}", obj))
            out += [(f"{prefix}.{name}.{m}", v) for m, v in sorted(vars(obj).items())
                    if not m.startswith("_") and inspect.isfunction(v)]
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append((f"{prefix}.{name}", obj))
    return out


def docstrings() -> list[tuple[str, str]]:
    """(qualified name, docstring) for every documented module and member, in a fixed order."""
    seen, out = set(), []
    for mod_name in MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:  # e.g. a stdlib module this build omits
            continue
        for name, obj in [(mod_name, module), *_members(module, mod_name)]:
            doc = inspect.getdoc(obj)
            if doc and doc.strip() and doc not in seen:  # inherited / aliased docstrings once
                seen.add(doc)
                out.append((name, doc.strip()))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: corpus.py OUT.jsonl", file=sys.stderr)
        return 2
    docs = docstrings()
    with open(argv[0], "w", encoding="utf-8") as handle:
        for _, doc in docs:
            handle.write(json.dumps({"text": doc}) + "\n")
    print(f"corpus: {len(docs)} docstrings, {sum(len(d) for _, d in docs)} characters -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

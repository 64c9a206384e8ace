# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""A bytecode cache for this collection's module_utils when a module runs from its AnsiballZ zip.

Python caches bytecode beside source files (`__pycache__`), but not for modules it imports
from a zip, which is how Ansible ships a module and its module_utils to a managed host: every
module run compiled the whole engine again (tens of milliseconds for every task on every host,
the largest cost of a re-check after Ansible's own). Importing this module installs an import
finder that, for this collection's module_utils only and only when they come from a zip,
keeps the compiled code in a per-user cache directory and uses it while the source is the same.

What makes it safe to load code from there:
- the file name is the SHA-256 of the module's name, its source text and the interpreter's
  bytecode magic number: other source or another Python never reads the entry;
- the directory and each file must belong to the user the module runs as and be writable by
  nobody else (as Python's own `__pycache__` is), and are opened without following links;
- entries are written to a temporary name and renamed, so a reader never sees half of one;
- anything unexpected (no home directory, a read-only one, a bad entry) falls back to
  compiling, as without the cache: the cache changes how long an import takes, never what
  runs.

The directory is `$XDG_CACHE_HOME/vdisk.qcow2/bytecode` (default `~/.cache/...`), at most
`LIMIT` entries (the oldest are removed); `VDISK_QCOW2_BYTECODE_CACHE=off` in the module's
environment turns the cache off. It is the one file the modules write outside the images they
manage, in check mode too (as Ansible writes its own temporary files there).
"""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import hashlib
import marshal
import os
import stat
import sys

try:
    import zipimport
    from importlib.machinery import ModuleSpec
    from importlib.util import MAGIC_NUMBER
except ImportError:                                     # pragma: no cover
    zipimport = ModuleSpec = MAGIC_NUMBER = None

PREFIX = __name__.rpartition(".")[0] + "."
ENV = "VDISK_QCOW2_BYTECODE_CACHE"
LIMIT = 128


def cache_dir(environ=None):
    """The cache directory for this user, or None when turned off or there is no home."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "").lower() in ("0", "off", "no", "false"):
        return None
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    return os.path.join(base, "vdisk.qcow2", "bytecode")


def _private(st, kind):
    """A node of `kind` that only this user can change."""
    return kind(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _ready(directory):
    """Create the directory (mode 0700) if needed; True when it is safe to use."""
    try:
        os.makedirs(directory, 0o700)
    except OSError:
        pass
    try:
        return _private(os.lstat(directory), stat.S_ISDIR)
    except OSError:
        return False


def _key(name, source):
    digest = hashlib.sha256(MAGIC_NUMBER)
    digest.update(name.encode("utf-8") + b"\0")
    digest.update(source.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:40]


def _read(path):
    """The code stored at `path`, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if not _private(os.fstat(fd), stat.S_ISREG):
            return None
        with os.fdopen(fd, "rb") as handle:
            fd = None
            data = handle.read()
    except OSError:
        return None
    finally:
        if fd is not None:
            os.close(fd)
    if data[:len(MAGIC_NUMBER)] != MAGIC_NUMBER:
        return None
    try:
        return marshal.loads(data[len(MAGIC_NUMBER):])
    except (EOFError, ValueError, TypeError):
        return None


def _write(directory, path, code):
    temp = "%s.%d.tmp" % (path, os.getpid())
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(MAGIC_NUMBER + marshal.dumps(code))
        os.rename(temp, path)
    except (OSError, ValueError):
        try:
            os.unlink(temp)
        except OSError:
            pass
        return
    _trim(directory)


def _trim(directory):
    """Keep the newest LIMIT entries (a new collection version or Python adds entries)."""
    try:
        names = [n for n in os.listdir(directory) if n.endswith(".bin")]
        if len(names) <= LIMIT:
            return
        aged = sorted(names, key=lambda n: os.lstat(os.path.join(directory, n)).st_mtime)
        for name in aged[:len(names) - LIMIT]:
            os.unlink(os.path.join(directory, name))
    except OSError:
        pass


class _CachingLoader:
    """Loads a module of the zip: the cached code when its source is unchanged, else compiles
    it (and stores the code)."""

    def __init__(self, inner, directory):
        self._inner = inner
        self._dir = directory

    def create_module(self, spec):    # pylint: disable=unused-argument
        return None

    def exec_module(self, module):
        name = module.__name__
        source = self._inner.get_source(name)
        origin = module.__spec__.origin
        code = None
        path = None
        if source is not None and self._dir is not None:
            path = os.path.join(self._dir, _key(name, source) + ".bin")
            code = _read(path)
        if code is not None:
            _fix_filename(code, origin)
        elif source is None:
            code = self._inner.get_code(name)
        else:
            code = compile(source, origin, "exec", dont_inherit=True)
            if path is not None:
                _write(self._dir, path, code)
        exec(code, module.__dict__)   # pylint: disable=exec-used

    def get_source(self, name):
        return self._inner.get_source(name)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


def _fix_filename(code, origin):
    """Tracebacks name this run's zip, not the one the entry was compiled from."""
    try:
        import _imp
        _imp._fix_co_filename(code, origin)    # pylint: disable=protected-access
    except (ImportError, AttributeError, TypeError):
        pass


class _Finder:
    """Finds this collection's module_utils in the zip the package came from, and gives them
    the caching loader.

    The spec is built here rather than by zipimport's own find_spec, which compiles the module
    once just to name its file (and its loader then compiles it again)."""

    def __init__(self, directory):
        self._dir = directory

    def find_spec(self, fullname, path=None, target=None):    # pylint: disable=unused-argument
        if not fullname.startswith(PREFIX) or not path:
            return None
        last = fullname.rpartition(".")[2]
        for entry in path:
            try:
                importer = zipimport.zipimporter(entry)
                package = importer.is_package(fullname)
            except (zipimport.ZipImportError, OSError, TypeError, ValueError):
                continue
            where = entry + "/" + last
            spec = ModuleSpec(fullname, _CachingLoader(importer, self._dir),
                              origin=where + ("/__init__.py" if package else ".py"),
                              is_package=package)
            spec.has_location = True
            if package:
                spec.submodule_search_locations = [where]
            return spec
        return None


def install():
    """Put the finder first on sys.meta_path (once), when this module came from a zip."""
    if MAGIC_NUMBER is None or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    spec = globals().get("__spec__")
    if spec is None or not isinstance(spec.loader, zipimport.zipimporter):
        return
    directory = cache_dir()
    if directory is None or not _ready(directory):
        return
    sys.meta_path.insert(0, _Finder(directory))


install()

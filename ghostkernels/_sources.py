"""Whether a built CPU library was made from the C++ sources beside it (standard library only).

setup.py writes the digest of csrc/ beside each library it builds (it loads this file by path:
importing the package needs the build); the loader (_backends.load_cpu_extension) compares it
with csrc/ as it is now when the package runs from a source checkout (an editable install). A
library older than its sources may not match the ops' Python schemas, and a C++ registration that
does not match one aborts the process as the library loads: a `git pull` without a rebuild then
runs the reference, with one warning and the reason in ghostkernels.backends().
"""

import hashlib
import os

# The digest file of a library: its file name plus this.
DIGEST_SUFFIX = ".sources-sha256"
_SOURCE_SUFFIXES = (".cpp", ".h")


def digest(source_dir):
    """sha256 of the names and bytes of source_dir's C++ files."""
    sha = hashlib.sha256()
    for name in sorted(os.listdir(source_dir)):
        if name.endswith(_SOURCE_SUFFIXES):
            sha.update(name.encode() + b"\0")
            with open(os.path.join(source_dir, name), "rb") as f:
                sha.update(f.read())
    return sha.hexdigest()


def stale_reason(library):
    """Why `library` (this package's CPU library) was not built from csrc/ as the source checkout
    holds it now, or None where it was or where there is no checkout (an installed wheel)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(library)))
    source_dir = os.path.join(root, "csrc")
    if not (os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(source_dir)):
        return None
    try:
        with open(library + DIGEST_SUFFIX) as f:
            built_from = f.read().strip()
    except OSError:
        built_from = None
    if built_from == digest(source_dir):
        return None
    cause = "csrc/ changed since it was built" if built_from else "its build predates the sources digest"
    return (f"{library} is older than csrc/ ({cause}), and a library that does not match the ops' "
            "schemas would abort the process as it loads; rebuild: `pip install --no-build-isolation -e .`")

import os
import sys

# tests import the project from the checkout, and `tests.helpers` as a package
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED = os.path.join(os.path.dirname(ROOT), "shared")

# CI runs the same hypothesis examples every time (a red CI must be reproducible); local runs explore new ones.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# counting passes of windowed samplers are cached on disk for memory-mapped metadata (samplers.plan_cache): the
# tests keep theirs in a directory of their own, removed at exit, never in the user's ~/.cache
if "DATAPIPE_PLAN_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _PLAN_CACHE = tempfile.mkdtemp(prefix="datapipe-plan-cache-")
    os.environ["DATAPIPE_PLAN_CACHE"] = _PLAN_CACHE
    atexit.register(shutil.rmtree, _PLAN_CACHE, True)

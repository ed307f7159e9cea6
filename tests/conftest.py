"""Shared fixtures. Tests run real Paddle ops on real files; nothing here mocks a library."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Keep runs quiet and single-threaded so two cores are enough for the whole suite.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PADDLE_DISABLE_WARNINGS", "1")

import subprocess  # noqa: E402

import pytest  # noqa: E402

PY = sys.executable
TINY_INIT = os.path.join(ROOT, "sd", "tiny_init")


def make_parts(out_dir: str, num_images: int, image_size: int = 32, seed: int = 0, per_part: int = 24) -> str:
    """A real demo dataset written by the real tool; returns the .filelist.list path."""
    from data_tools.make_demo_data import generate_demo_dataset

    jsonl = generate_demo_dataset(os.path.join(out_dir, "raw"), num_images, image_size=image_size, seed=seed)
    subprocess.run([PY, os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", jsonl,
                    "--output_path", out_dir, "--output_name", "demo", "--per_part_file_num", str(per_part),
                    "--save_gzip_file", "--num_workers", "1"], check=True, capture_output=True, cwd=ROOT)
    return os.path.join(out_dir, "filelist", "demo.filelist.list")


@pytest.fixture(scope="session")
def demo_file_list(tmp_path_factory) -> str:
    """96 demo records of 32 px in 4 gzip parts, shared by the tests of a session (read-only)."""
    return make_parts(str(tmp_path_factory.mktemp("demo_parts")), 96)

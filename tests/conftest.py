import os

import pytest
import torch

# Tests share 2 cores with whatever else runs; TRCE_TEST_THREADS=1 keeps them polite.
if os.environ.get("TRCE_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["TRCE_TEST_THREADS"]))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random SD-layout pipeline saved as a diffusers folder."""
    from trce.testing import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture()
def tiny_pipe():
    from trce.testing import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture()
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from trce.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run

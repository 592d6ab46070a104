"""The package's front door: public entry points by name, resolved on first use, nothing heavy on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

import echodistill


def test_every_public_name_resolves_to_what_its_room_defines():
    from echodistill.concepts.bundle import ConceptBundle
    from echodistill.jobs.runs import train_concept
    from echodistill.models.pair import load_model_pair
    from echodistill.sampling.samplers import sample_student
    from echodistill.training.config import TrainConfig

    for name in echodistill.__all__:
        assert getattr(echodistill, name) is not None, name
    assert echodistill.load_model_pair is load_model_pair and echodistill.TrainConfig is TrainConfig
    assert echodistill.train_concept is train_concept and echodistill.sample_student is sample_student
    assert echodistill.ConceptBundle is ConceptBundle
    assert set(echodistill.__all__) <= set(dir(echodistill))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_entry_point'"):
        echodistill.no_such_entry_point


def test_importing_the_package_and_the_command_line_loads_no_torch_nor_ray():
    code = ("import sys, echodistill, echodistill.cli; "
            "print(sorted(m for m in ('torch', 'diffusers', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr

"""Capability probes: the known answers score as documented, wrong continuations fail, models plug in."""

from __future__ import annotations

import pytest
import torch

from framework.metrics.probes import (
    CameraPanProbe,
    ConstantMotionProbe,
    ObjectPermanenceProbe,
    text_to_video,
)


def test_object_permanence_passes_only_the_true_continuation():
    report = ObjectPermanenceProbe().run()
    assert report.baselines == {"ground_truth": 1.0, "freeze_last_context_frame": 0.0, "object_vanishes": 0.0,
                                "colour_changes_behind_occluder": 0.0}


def test_object_permanence_checks_shape_and_scores_a_model():
    probe = ObjectPermanenceProbe()
    cases = probe.cases()
    assert {c.shape for c in cases} == {"square", "circle"} and len(cases) == 12
    case = next(c for c in cases if c.colour == "red" and c.shape == "square")
    background = "black"
    assert probe.score(case, probe.render("red", "circle", background)) == 0.0  # came out as the wrong shape
    assert probe.score(case, probe.render("red", "square", background)) == 1.0
    no_bar = probe.render("red", "square", background)
    no_bar[:, :, :, probe.occluder[0]: probe.occluder[1]] = -1.0  # the scene without its occluder
    assert probe.score(case, no_bar) == 0.0
    half_right = probe.run(lambda cs: [c.target if i % 2 == 0 else torch.zeros_like(c.target)
                                       for i, c in enumerate(cs)])
    assert half_right.model == pytest.approx(0.5)


def test_constant_motion_measures_the_kept_velocity():
    report = ConstantMotionProbe().run()
    assert report.baselines["ground_truth"] > 0.95  # integer-pixel rendering of a 0.5 px/frame motion
    assert report.baselines["freeze_last_context_frame"] == 0.0
    assert report.baselines["stops_half_way"] == 0.0
    probe = ConstantMotionProbe()
    case = probe.cases()[0]  # 1 px/frame to the right
    half_speed = probe.render(case.colour, (0.5, 0.0))
    assert probe.score(case, half_speed) == pytest.approx(0.5, abs=0.05)


def test_camera_pan_warping_error_separates_pan_from_shuffle():
    report = CameraPanProbe(num_cases=2).run()
    assert not report.higher_is_better
    assert report.baselines["ground_truth"] < 1e-3
    assert report.baselines["shuffled_frames"] > 20 * report.baselines["ground_truth"]


def test_text_to_video_adapter_and_wrong_model_output():
    class FakeModule:
        def generate(self, captions, sizes, seeds, steps=None):
            self.calls = (captions, sizes, seeds, steps)
            return [torch.zeros(3, *size) for size in sizes]

    module = FakeModule()
    probe = ConstantMotionProbe()
    report = probe.run(text_to_video(module, steps=3, seed=10))
    captions, sizes, seeds, steps = module.calls
    assert captions[0].startswith("a red square moving right") and sizes[0] == (32, 24, 48)
    assert seeds == list(range(10, 10 + len(captions))) and steps == 3
    assert report.model == 0.0  # a blank video has no object
    with pytest.raises(ValueError, match="returned 1 videos for 9 cases"):
        probe.run(lambda cases: [cases[0].target])

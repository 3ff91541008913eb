"""Every term's options on the digits models, by case name (tests/objectives/test_terms.py and test_flow.py)."""


def term_specs(specs):
    """`specs`: the `specs` fixture (tests/objectives/conftest.py)."""
    return {
        "denoise": {},
        "anchor": {},
        "nr_iqa": {"metric": specs["cnniqa"], "x0": {"source": "one_step", "t_range": [0, 400]}},
        "nr_iqa_sampled": {"metric": specs["cnniqa"], "x0": {"source": "sampled", "sampling_steps": 3, "feedback_steps": 1}},
        "lpips_x0": {"metric": specs["network"]},
        "self_perceptual": {},
        "pefl": {"network": specs["network"], "x0": "one_step"},
        "pefl_rollout": {"network": specs["network"]},  # UniFL's default: a rollout from the noised real image
        "pefl_segmentation": {"segmenter": specs["segmenter"]},
        "decoupled_rewards": {"rewards": {"sharp": {"model": specs["cnniqa"]}, "clean": {"model": specs["heldout"], "weight": 0.5}},
                              "x0": "one_step"},
        "decoupled_rewards_rollout": {"rewards": {"sharp": {"model": specs["cnniqa"]}}, "x0": {"sampling_steps": 4}},  # UniFL's: ReFL's rollout from noise
        "adversarial": {"discriminator": specs["cnniqa"], "x0": {"source": "one_step", "t_range": [0, 500]}},
        "adversarial_rollout": {"discriminator": specs["cnniqa"]},
    }

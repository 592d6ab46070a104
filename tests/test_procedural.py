"""The procedural subject family, its captions and data, and the zero-training image-prompt adapter."""

from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch

from echodistill.miniworld import architecture as arch
from echodistill.miniworld.concepts import CONCEPTS, evaluation_prompts, reference_images
from echodistill.miniworld.data import render_set
from echodistill.miniworld.grammar import SHAPES, sample_scene
from echodistill.miniworld.procedural import (
    ALL_COLORS, BASE_SEEDS, DECORATIONS, ORACLE_SEEDS, PATTERN_WORDS, VALIDATION_SEEDS, decoration_phrase, is_procedural,
    lookup_subject, procedural_caption, procedural_name, procedural_subject,
)
from echodistill.miniworld.render import render


def test_seed_ranges_are_disjoint_so_no_oracle_scores_a_subject_it_trained_on():
    ranges = [BASE_SEEDS.seeds(), ORACLE_SEEDS.seeds(), VALIDATION_SEEDS.seeds()]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start


def test_a_subject_is_the_same_picture_for_the_same_seed_and_another_for_another():
    scene = sample_scene(np.random.default_rng(0), procedural_name(5))
    first = render(scene, np.random.default_rng(1))
    procedural_subject.cache_clear()  # rebuilt from the seed, not remembered
    again = render(scene, np.random.default_rng(1))
    other = render(sample_scene(np.random.default_rng(0), procedural_name(6)), np.random.default_rng(1))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_subjects_have_grammar_outlines_several_colours_and_caption_words():
    subjects = [procedural_subject(seed) for seed in range(200)]
    assert {s.class_word for s in subjects} == set(SHAPES)
    assert {s.pattern_word for s in subjects} - {None} == set(PATTERN_WORDS.values())
    # every body colour has a word, palette or not; one or two decorations, each in a colour other than the body's
    assert {s.color_word for s in subjects} == set(ALL_COLORS)
    assert {len(s.decorations) for s in subjects} == {1, 2}
    assert all(s.color_word not in {c for _, c in s.decorations} for s in subjects)
    assert {kind for s in subjects for kind, _ in s.decorations} == set(DECORATIONS)
    # multi-colour: a reference shows more distinct colours than a plain shape on a plain background (2)
    colours = [len(np.unique(reference_images(s).reshape(-1, 3), axis=0)) for s in subjects[:10]]
    assert min(colours) > 2


def test_lookup_knows_named_and_procedural_subjects_and_refuses_others():
    assert lookup_subject("smiley") is CONCEPTS["smiley"]
    assert lookup_subject("procedural_42").name == "procedural_42" and is_procedural("procedural_42")
    for bad in ("procedural_", "procedural_x", "dog", "procedural_-1"):
        with pytest.raises(ValueError, match="unknown subject"):
            lookup_subject(bad)
    with pytest.raises(ValueError, match="non-negative"):
        procedural_subject(-1)


def test_procedural_captions_name_the_class_and_only_the_words_the_subject_has():
    subject = next(procedural_subject(s) for s in range(2000) if procedural_subject(s).pattern_word
                   and len(procedural_subject(s).decorations) == 2 and " " in procedural_subject(s).color_word)
    rng = np.random.default_rng(3)
    texts, listed = set(), 0
    for _ in range(80):
        scene = sample_scene(rng, subject.name)
        scene, caption = procedural_caption(scene, subject, rng)
        text = f" {caption.text} "
        assert f" {subject.class_word} " in text and caption.stated["shape"] == subject.class_word
        if "color" in caption.stated:  # "light blue" too: two words
            before_noun = text.split(f" {subject.class_word}")[0] + " "
            assert caption.stated["color"] == subject.color_word and f" {subject.color_word} " in before_noun
        if "pattern" in caption.stated:
            assert f" {subject.pattern_word} " in text and "decoration" not in caption.stated
        if "decoration" in caption.stated:  # every decoration listed with its colour, the first one labelled
            listed += 1
            assert (caption.stated["decoration"], caption.stated["decoration_color"]) == subject.decorations[0]
            assert f" with {decoration_phrase(subject.decorations)}" in text
        texts.add(caption.text)
    assert len(texts) > 20 and 20 < listed < 60  # omissions, templates and listing vary them


def test_decoration_phrases_and_articles_read_as_english():
    assert decoration_phrase((("stripes", "blue"), ("core", "white"))) == "blue stripes and a white core"
    assert decoration_phrase((("checker", "light blue"),)) == "light blue checks"
    assert decoration_phrase((("cross", "red"),)) == "a red cross"
    assert decoration_phrase((("half", "orange"), ("band", "teal"))) == "an orange half and a teal band"
    orange = next(procedural_subject(s) for s in VALIDATION_SEEDS.seeds() if procedural_subject(s).color_word == "orange")
    assert orange.description.startswith("an orange ")
    captions = [procedural_caption(sample_scene(np.random.default_rng(i), orange.name), orange, np.random.default_rng(i))[1]
                for i in range(40)]
    assert not any(" a orange" in f" {c.text}" for c in captions) and any(" an orange" in f" {c.text}" for c in captions)


def test_text_encoder_heads_cover_every_word_a_caption_states():
    from echodistill.miniworld.training import TEXT_ATTRIBUTES, stated_labels

    captions = render_set(300, 0).captions
    labels = stated_labels(captions)  # raises ValueError for a stated word no head knows
    for name, choices in TEXT_ATTRIBUTES.items():
        assert labels[name].shape == (300,) and int(labels[name].max()) <= len(choices)
    for name in ("decoration", "decoration_color", "pattern", "color"):
        assert (labels[name] < len(TEXT_ATTRIBUTES[name])).any(), name  # each head sees stated words


def test_base_data_mixes_plain_shapes_and_procedural_subjects_but_never_the_named_concepts():
    rendered = render_set(64, 0)
    names = [scene.subject for scene in rendered.scenes]
    procedural = [n for n in names if is_procedural(n)]
    assert 10 < len(procedural) < 54
    assert all(int(n.split("_")[1]) in BASE_SEEDS.seeds() for n in procedural)
    assert not set(names) & set(CONCEPTS)
    oracle_names = [s.subject for s in render_set(64, 0, oracle=True).scenes if is_procedural(s.subject)]
    assert oracle_names and all(int(n.split("_")[1]) in ORACLE_SEEDS.seeds() for n in oracle_names)


def test_any_subject_has_references_and_evaluation_prompts():
    subject = procedural_subject(VALIDATION_SEEDS.start)
    assert reference_images(subject).shape == (5, 64, 64, 3)
    prompts = evaluation_prompts(subject)
    assert len(prompts) == 12 and all(f"{{token}} {subject.class_word}" in p.text for p in prompts)
    assert not any(p.scene.bg_color in subject.clashes for p in prompts)
    # the named concepts keep the references they always had
    assert np.array_equal(reference_images(CONCEPTS["smiley"]), reference_images(CONCEPTS["smiley"]))


def test_world_architecture_attends_at_the_highest_level_and_in_the_mid_block():
    unet = arch.build_unet()
    cross = [name for name, _ in unet.named_modules() if name.endswith("attn2")]
    assert any(name.startswith("down_blocks.0.") for name in cross)  # 16×16 latents
    assert any(name.startswith("up_blocks.3.") for name in cross)
    assert any(name.startswith("mid_block.") for name in cross)
    assert unet.config.cross_attention_dim == arch.TEXT_WIDTH == arch.build_text_encoder().config.hidden_size


# --- the image-prompt adapter -----------------------------------------------------------------

def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    ).eval()


def test_image_prompt_adapter_attaches_steers_and_restores_the_unet(tmp_path):
    from echodistill.miniworld.image_prompt import ImagePromptAdapter

    unet = _tiny_unet()
    adapter = ImagePromptAdapter.for_unet(unet, tokens=2, width=8).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 10])
    text = torch.randn(2, 77, 16)
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    plain = unet(x, t, encoder_hidden_states=text).sample
    pictures = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad(), adapter.attached(unet, scale=1.0):
        tokens = adapter.image_tokens(pictures)
        assert tokens.shape == (2, 2, 16)
        steered = unet(x, t, encoder_hidden_states=(text, [tokens])).sample
    with torch.no_grad(), adapter.attached(unet, scale=0.0):
        zero_scale = unet(x, t, encoder_hidden_states=(text, [tokens])).sample
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    assert not torch.allclose(steered, plain, atol=1e-5)
    torch.testing.assert_close(zero_scale, plain, atol=1e-5, rtol=1e-5)  # scale 0: the UNet as it was
    path = adapter.save(tmp_path / "adapter.safetensors")
    loaded = ImagePromptAdapter.load(path)
    torch.testing.assert_close(loaded.image_tokens(pictures), adapter.image_tokens(pictures).half().float(),
                               atol=2e-2, rtol=2e-2)


def test_image_prompt_adapter_refuses_another_unet_and_a_missing_file(tmp_path):
    from echodistill.miniworld.image_prompt import ImagePromptAdapter, ImagePromptError

    adapter = ImagePromptAdapter.for_unet(_tiny_unet(), tokens=2, width=8)
    with pytest.raises(ImagePromptError, match="other cross-attention layers"):
        with adapter.attached(arch.build_unet()):
            pass
    with pytest.raises(ImagePromptError, match="not found"):
        ImagePromptAdapter.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10" + bytes(40))  # truncated, not safetensors: one error naming the file
    with pytest.raises(ImagePromptError, match=r"junk.safetensors is not a readable safetensors file \(its header is "
                       r"damaged; safetensors says: [^)]*\): rebuild it with scripts/train_miniworld.py --image-prompt-only"):
        ImagePromptAdapter.load(junk)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, junk, metadata={"class": "ImagePromptAdapter", "config": "{}"})
    with pytest.raises(ImagePromptError, match="does not hold an adapter this version can read"):
        ImagePromptAdapter.load(junk)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_image_prompt_student_is_the_library_student_sampler_with_the_adapter_in_its_cross_attention(
    tiny_pair_folders, dtype
):
    from echodistill.miniworld.image_prompt import ImagePromptAdapter, image_prompt_student
    from echodistill.models.pair import load_model_pair
    from echodistill.sampling.samplers import native_resolution, sample_student

    pair = load_model_pair(*tiny_pair_folders, dtype=dtype)
    unet = pair.student.unet
    torch.manual_seed(0)
    adapter = ImagePromptAdapter.for_unet(unet, tokens=2, width=8).eval()
    references = torch.rand(3, 3, 64, 64)
    prompts, seeds = ["a large circle on the left, on a blue striped background", "a small ring"], [5, 9]
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    for size in (64, None):  # None: the student's native size, as the samplers default to
        side = size or native_resolution(pair)
        plain = sample_student(pair, prompts, seeds=seeds, width=side, height=side, return_latents=False).images
        silent = image_prompt_student(pair, adapter, references, prompts, seeds, 0.0, width=size, height=size)
        steered = image_prompt_student(pair, adapter, references, prompts, seeds, width=size, height=size)
        assert silent.shape == steered.shape == (2, 3, side, side) and steered.dtype == torch.float32
        assert torch.equal(silent, plain)  # same noise, t = 999, prompt encoding, precision and decoding
        assert (steered - plain).abs().max() > 1e-3
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    assert {p.dtype for p in adapter.parameters()} == {torch.float32}  # a half-precision pair leaves it as it was


def test_image_prompt_training_changes_only_the_adapter_and_a_cut_run_resumes_as_an_uncut_one(
    tiny_pair_folders, tmp_path, cut_after_checkpoint
):
    from echodistill.miniworld.image_prompt import ImagePromptSettings, train_image_prompt
    from echodistill.models.pair import load_model_pair

    pair = load_model_pair(*tiny_pair_folders)
    parts = (pair.teacher.unet, pair.vae, pair.tokenizer, pair.text_encoder, pair.teacher.scheduler_config)
    settings = ImagePromptSettings(pairs=6, steps=4, batch=2, warmup=1, checkpoint_every=2)
    quiet = lambda message: None  # noqa: E731
    frozen = {k: v.clone() for k, v in pair.teacher.unet.state_dict().items()}
    uncut = train_image_prompt(*parts, settings, 0, quiet)
    assert all(torch.equal(frozen[k], v) for k, v in pair.teacher.unet.state_dict().items())  # only the adapter

    state = tmp_path / "image_prompt_running.pt"
    with cut_after_checkpoint("image_prompt_running.pt"):
        train_image_prompt(*parts, settings, 0, quiet, resume_path=state)
    assert torch.load(state, weights_only=True)["step"] == 2
    lines = []
    resumed = train_image_prompt(*parts, settings, 0, lines.append, resume_path=state)
    assert any("image prompt resumed" in line and "step 2/4" in line for line in lines), lines
    fresh = train_image_prompt(*parts, dataclasses.replace(settings, steps=0), 0, quiet)  # the initial weights
    for (name, a), b in zip(uncut.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(uncut.state_dict().values(), fresh.state_dict().values()))


def test_oracle_training_cut_off_and_resumed_ends_as_an_uncut_run(tmp_path, monkeypatch, cut_after_checkpoint):
    from echodistill.miniworld import oracle_train

    train, valid = render_set(24, 0, oracle=True), render_set(8, 1, oracle=True)
    pool = oracle_train.subject_views(6, 2, seed=0)
    settings = oracle_train.OracleSettings(reader_steps=4, reader_batch=4, steps=4, subjects_per_batch=3, warmup=1,
                                           checkpoint_every=2)
    quiet = lambda message: None  # noqa: E731
    monkeypatch.setattr(oracle_train, "validation_report", lambda oracle, valid: {})
    uncut = oracle_train.train_oracles(train, valid, pool, settings, 0, quiet)

    state = tmp_path / "oracle_running.pt"
    saved = []
    with cut_after_checkpoint("oracle_running_encoder.pt", saved):  # right after the encoder's first checkpoint
        oracle_train.train_oracles(train, valid, pool, settings, 0, quiet, resume_path=state)
    assert saved == ["oracle_running_reader.pt", "oracle_running_reader.pt", "oracle_running_encoder.pt"]
    assert torch.load(tmp_path / "oracle_running_reader.pt", weights_only=True)["step"] == 4  # finished
    assert torch.load(tmp_path / "oracle_running_encoder.pt", weights_only=True)["step"] == 2
    lines = []
    resumed = oracle_train.train_oracles(train, valid, pool, settings, 0, lines.append, resume_path=state)
    assert any("reader resumed" in line and "step 4/4" in line for line in lines), lines
    assert any("encoder resumed" in line and "step 2/4" in line for line in lines), lines
    for uncut_module, resumed_module in ((uncut.reader, resumed.reader), (uncut.encoder, resumed.encoder)):
        for (name, a), b in zip(uncut_module.state_dict().items(), resumed_module.state_dict().values()):
            assert torch.equal(a, b), name


def test_look_alike_batches_group_each_anchor_with_its_mined_neighbours():
    from echodistill.miniworld.oracle_train import SubjectViews, _hard_batch

    subjects, views = 12, 3
    pool = SubjectViews(np.zeros((subjects * views, 64, 64, 3), np.uint8), np.repeat(np.arange(subjects), views), views)
    nearest = torch.tensor([[(i + k) % subjects for k in range(1, 9)] for i in range(subjects)])  # (12, 8)
    index = _hard_batch(pool, nearest, subjects=8, neighbours=4, generator=torch.Generator().manual_seed(0))
    assert index.shape == (16,)
    first, second = (index[:8] // views).tolist(), (index[8:] // views).tolist()
    assert first == second and len(set(first)) == 8  # two pictures of each of 8 distinct subjects
    assert (index[:8] % views != index[8:] % views).all()  # and two different views of it
    for group in (first[:4], first[4:]):  # an anchor, then three of its eight mined neighbours
        assert set(group[1:]) <= set(nearest[group[0]].tolist()), group


def test_mined_neighbours_are_the_nearest_other_subjects_by_cosine():
    from echodistill.miniworld.oracle import SubjectEncoder
    from echodistill.miniworld.oracle_train import nearest_subjects, subject_views

    torch.manual_seed(0)
    encoder = SubjectEncoder().train()
    pool = subject_views(10, 2, seed=3)
    nearest = nearest_subjects(encoder, pool, count=3, chunk=4)  # chunks smaller than the pool
    assert nearest.shape == (10, 3) and encoder.training  # left as it was found
    with torch.no_grad():
        embeddings = encoder.eval()(torch.from_numpy(pool.images[::2]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    similarity = (embeddings @ embeddings.T).fill_diagonal_(-2.0)
    assert torch.equal(nearest, similarity.topk(3, dim=1).indices)
    assert all(i not in row for i, row in enumerate(nearest.tolist()))


def test_an_outline_twin_keeps_the_subjects_colours_and_decorations_on_another_shape():
    from echodistill.miniworld.grammar import SHAPES
    from echodistill.miniworld.procedural import lookup_subject

    subject = procedural_subject(1234)
    shape = next(s for s in SHAPES if s != subject.class_word)
    twin = procedural_subject(1234, outline=shape)
    assert twin.class_word == shape and twin.name == f"procedural_1234_as_{shape}"
    assert (twin.color_word, twin.decorations) == (subject.color_word, subject.decorations)
    assert lookup_subject(twin.name).description == twin.description
    assert procedural_subject(1234).description == subject.description  # the subject itself is unchanged
    u, v = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 48))
    body, twin_body = subject.paint(u, v)[0][0], twin.paint(u, v)[0][0]
    assert body.any() and twin_body.any() and (body != twin_body).any()  # another outline
    with pytest.raises(ValueError, match="outline 'blob'"):
        procedural_subject(1234, outline="blob")


def test_outline_twin_batches_hold_each_subject_with_its_twin():
    from echodistill.miniworld.oracle import GRAMMAR_SUBJECTS
    from echodistill.miniworld.oracle_train import _twin_batch, outline_twin_views

    pool = outline_twin_views(6, 2, seed=3)
    assert pool.images.shape == (24, 64, 64, 3)
    labels = pool.labels.reshape(12, 2)[:, 0]
    subjects, twins = labels[0::2], labels[1::2]
    assert (subjects >= len(GRAMMAR_SUBJECTS)).all() and (twins < 0).all() and len(set(labels)) == 12
    index = _twin_batch(pool, subjects=4, generator=torch.Generator().manual_seed(0))
    first = (index[:4] // 2).tolist()  # picture index -> pool subject (2 views each)
    assert first[0] // 2 == first[1] // 2 and first[0] % 2 == 0 and first[1] == first[0] + 1  # a subject, its twin
    assert first[2] // 2 == first[3] // 2 and first[2] + 1 == first[3] and first[0] != first[2]
    assert (index[:4] // 2 == index[4:] // 2).all() and (index[:4] % 2 != index[4:] % 2).all()


@pytest.mark.parametrize("phase", ["look-alikes", "outline twins"])
def test_a_refinement_phase_cut_off_and_resumed_ends_as_an_uncut_run(phase, tmp_path, cut_after_checkpoint):
    from echodistill.miniworld import oracle_train
    from echodistill.miniworld.oracle import SubjectEncoder

    if phase == "look-alikes":  # mined at steps 1 and 4, cut after step 2: the resumed run must use step 1's
        pool = oracle_train.subject_views(12, 2, seed=0)
        settings = oracle_train.OracleSettings(subjects_per_batch=8, hard_steps=5, neighbours=4, mine_every=3,
                                               warmup=1, checkpoint_every=2)
        refine = oracle_train.refine_on_look_alikes
    else:
        pool = oracle_train.outline_twin_views(6, 2, seed=0)
        settings = oracle_train.OracleSettings(subjects_per_batch=4, twin_steps=5, warmup=1, checkpoint_every=2)
        refine = oracle_train.refine_on_outline_twins
    quiet = lambda message: None  # noqa: E731

    def start() -> SubjectEncoder:
        torch.manual_seed(1)
        return SubjectEncoder()

    uncut = refine(start(), pool, settings, 0, quiet)
    assert not any(torch.equal(a, b) for a, b in zip(uncut.state_dict().values(), start().state_dict().values())
                   if a.is_floating_point() and a.numel() > 1)  # it trained
    state = tmp_path / "oracle_running_refine.pt"
    with cut_after_checkpoint():  # the session ends right after the first checkpoint
        refine(start(), pool, settings, 0, quiet, resume_path=state)
    assert torch.load(state, weights_only=True)["step"] == 2
    lines = []
    resumed = refine(start(), pool, settings, 0, lines.append, resume_path=state)
    assert any(f"{phase} resumed" in line and "step 2/5" in line for line in lines), lines
    for (name, a), b in zip(uncut.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_subject_views_are_deterministic_pairs_of_one_subject_in_different_scenes():
    from echodistill.miniworld.oracle import GRAMMAR_SUBJECTS
    from echodistill.miniworld.oracle_train import subject_views

    pool = subject_views(40, 3, seed=5)
    again = subject_views(40, 3, seed=5)
    assert pool.images.shape == (120, 64, 64, 3) and pool.images.dtype == np.uint8
    assert np.array_equal(pool.images, again.images) and np.array_equal(pool.labels, again.labels)
    labels = pool.labels.reshape(40, 3)
    assert (labels == labels[:, :1]).all()  # a subject's views share its label
    procedural = labels[:, 0] >= len(GRAMMAR_SUBJECTS)
    assert procedural.any() and (~procedural).any()  # both kinds of subject are in the pool
    seeds = labels[procedural, 0] - len(GRAMMAR_SUBJECTS)
    assert all(seed in ORACLE_SEEDS.seeds() for seed in seeds)
    views = pool.images.reshape(40, 3, 64, 64, 3)
    assert all(not np.array_equal(views[i, 0], views[i, 1]) for i in range(40))  # scenes differ
    with pytest.raises(ValueError, match="two views"):
        subject_views(2, 1, seed=0)


def test_supervised_contrastive_loss_rewards_pulling_positives_together():
    from echodistill.miniworld.oracle_train import supervised_contrastive_loss

    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    exact = torch.eye(3).repeat(2, 1)  # each picture at cosine 1 to its partner, 0 to the rest
    shuffled = exact[[0, 1, 2, 1, 2, 0]]
    assert supervised_contrastive_loss(exact, labels, 0.1) < 0.01 < supervised_contrastive_loss(shuffled, labels, 0.1)
    # by hand at temperature 1 for one anchor: its positive at cos 1, four others at cos 0 -> -log(e / (e + 4))
    e = torch.exp(torch.tensor(1.0))
    assert torch.allclose(supervised_contrastive_loss(exact, labels, 1.0), -torch.log(e / (e + 4)))
    embeddings = torch.randn(6, 8, requires_grad=True)
    supervised_contrastive_loss(torch.nn.functional.normalize(embeddings, dim=1), labels, 0.1).backward()
    assert embeddings.grad.abs().sum() > 0
    # anchors without a positive (labels 1 and 2 here) are skipped rather than counted as zero
    lone = supervised_contrastive_loss(exact[:4], torch.tensor([0, 1, 2, 0]), 1.0)
    assert torch.allclose(lone, -torch.log(e / (e + 2)))


def test_negative_cosine_penalty_counts_only_other_subjects_above_zero():
    from echodistill.miniworld.oracle_train import negative_cosine_penalty

    labels = torch.tensor([0, 0, 1, 2])
    # 0 and 0: the same subject (never penalized); 0 vs 1 at cosine 0.6; 2 at cosine -0.8 to the rest (clipped)
    embeddings = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.8, 0.0, 0.6]])
    # ordered pairs of different subjects: 10 (of 12); four at 0.6 (0-2, 1-2 both ways), the rest clipped or 0
    cos_1_2 = float(embeddings[2] @ embeddings[3])  # -0.48: clipped
    assert cos_1_2 < 0
    expected = 4 * 0.6 ** 2 / 10
    assert torch.isclose(negative_cosine_penalty(embeddings, labels), torch.tensor(expected))
    assert negative_cosine_penalty(torch.eye(3), torch.tensor([0, 1, 2])) == 0


def test_hardest_negative_hinge_penalizes_each_anchors_closest_other_subject_beyond_the_margin():
    from echodistill.miniworld.oracle_train import hardest_negative_hinge

    angle = torch.tensor([0.0, 0.3, 1.2, 1.25])  # unit vectors in a plane: cos = cos(angle difference)
    embeddings = torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 2])  # 0 and 1 one subject: never each other's negative
    closest = torch.tensor([(1.2 - 0.0), (1.2 - 0.3), 0.05, 0.05]).cos()  # each anchor's nearest other subject
    expected = (closest - 0.5).clamp(min=0).pow(2).mean()
    assert torch.isclose(hardest_negative_hinge(embeddings, labels, 0.5), expected)
    assert hardest_negative_hinge(embeddings, labels, 1.0) == 0  # nothing beyond a margin of cos 1


def test_an_encoder_file_with_classifier_prototypes_still_loads(tmp_path):
    from safetensors.torch import save_file

    from echodistill.miniworld.oracle import SubjectEncoder, load_module

    encoder = SubjectEncoder(width=8, dim=16)
    state = {k: v.half() for k, v in encoder.state_dict().items()}
    state["prototypes"] = torch.zeros(5, 16, dtype=torch.float16)
    metadata = {"class": "SubjectEncoder", "config": '{"width": 8, "dim": 16, "subjects": 5, "scale": 16.0}',
                "labels": "[]"}
    save_file(state, str(tmp_path / "old.safetensors"), metadata=metadata)
    loaded = load_module(tmp_path / "old.safetensors", SubjectEncoder, None)
    assert loaded.config == {"width": 8, "dim": 16}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    reference = SubjectEncoder(width=8, dim=16)
    reference.load_state_dict({k: v.float() for k, v in state.items() if k != "prototypes"})
    assert torch.allclose(loaded(x), reference(x), atol=1e-5)

"""LongAlign §4 scorers (model/preference.py): segment-level embeddings, the common direction, retrieval.

A tiny randomly initialised CLIPModel stands in for PickScore / Denscore: every property checked here is
about how embeddings are combined, which does not depend on trained weights. Parity with transformers is
in test_score_cli.py.
"""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.clip import CONFIGS, CLIPModel
from model.kernels import ScoreParts, score_projection
from model.preference import (DIRECTION_FILE, KINDS, EncodedPrompts, Scorer, batch_direction, common_direction,
                              find_direction, fit_direction, infer_kind, load_direction, prompt_embeddings,
                              recall_at_1, recall_table, save_direction, similarities)
from model.tokenizer import CLIPTokenizer
from model.weights import WeightsError, save_state_dict

SENTENCES = ["A red cube rests on short green grass.", "Behind it stands a tall glass vase!",
             "Is the sky pale blue?", "Three small birds sit on the wooden fence."]
PROMPT = " ".join(SENTENCES)


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return Scorer(CLIPModel(CONFIGS["test"]), KINDS["pickscore"])


def embed_alone(scorer, texts):
    """Each text framed on its own as [sot] + ids + [eot], padded with 0 to 77, through the text tower."""
    ids = CLIPTokenizer()(texts, context_length=77, pad_token_id=0)
    with torch.no_grad():
        return scorer.model.encode_text(ids)


def random_images(count, seed):
    return torch.rand(count, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# Segment-level text embedding
# ---------------------------------------------------------------------------------------------------------

def test_prompt_embedding_is_the_plain_mean_of_normalized_sentence_embeddings(scorer):
    expected = F.normalize(embed_alone(scorer, SENTENCES), dim=-1).mean(dim=0)
    encoded = scorer.encode_prompts([PROMPT])
    assert encoded.segments.shape == (1, 4, scorer.embed_dim)
    torch.testing.assert_close(encoded.prompt_embedding()[0], expected, atol=1e-6, rtol=1e-5)
    assert expected.norm() < 0.999  # the mean is not renormalized


def test_score_equals_mean_per_sentence_cosine(scorer):
    images = random_images(1, 0)
    with torch.no_grad():
        image_embedding = scorer.encode_images(images)
    cosines = F.cosine_similarity(image_embedding, embed_alone(scorer, SENTENCES), dim=-1)
    parts = scorer.score(images, [PROMPT], direction=torch.randn(scorer.embed_dim))
    torch.testing.assert_close(parts.original, cosines.mean()[None], atol=1e-6, rtol=1e-5)


def test_single_mode_is_the_whole_prompt_truncated_to_77_tokens(scorer):
    long_prompt = " ".join(SENTENCES * 4)  # ~ 140 tokens
    encoded = scorer.encode_prompts([long_prompt], single=True)
    assert encoded.segments.shape[1] == 1
    torch.testing.assert_close(encoded.segments[:, 0], embed_alone(scorer, [long_prompt]))
    # what lies after token 75 cannot matter
    more = scorer.encode_prompts([long_prompt + " A completely different ending."], single=True)
    torch.testing.assert_close(more.segments, encoded.segments)


def test_max_sentences_keeps_the_first_sentences(scorer):
    full = scorer.encode_prompts([PROMPT])
    for k in (1, 2, 3):
        direct = F.normalize(embed_alone(scorer, SENTENCES[:k]), dim=-1).mean(dim=0)
        torch.testing.assert_close(full.prompt_embedding(k)[0], direct, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(scorer.encode_prompts([PROMPT], max_sentences=k).prompt_embedding()[0], direct,
                                   atol=1e-6, rtol=1e-5)
        assert int(full.segments_used(k)[0]) == k


def test_a_sentence_over_75_tokens_is_cut_into_segments_not_dropped(scorer):
    long_sentence = " ".join(["a small red cube beside a blue ball"] * 15) + "."  # 8 · 15 + 1 = 121 tokens
    encoded = scorer.encode_prompts([long_sentence + " The end."])
    assert encoded.sentence_index.tolist() == [[0, 0, 1]]
    assert int(encoded.segments_used(1)[0]) == 2  # max_sentences counts sentences, not pieces


def test_a_ragged_batch_gives_the_same_embeddings_as_one_prompt_at_a_time(scorer):
    prompts = [PROMPT, "A lone tree.", SENTENCES[2] + " " + SENTENCES[0]]
    batch = scorer.encode_prompts(prompts)
    assert batch.mask().sum(1).tolist() == [4, 1, 2]
    for i, prompt in enumerate(prompts):
        torch.testing.assert_close(batch.prompt_embedding()[i], scorer.encode_prompts([prompt]).prompt_embedding()[0],
                                   atol=1e-6, rtol=1e-5)


def test_empty_prompt_is_refused(scorer):
    with pytest.raises(ValueError, match="empty"):
        scorer.encode_prompts([PROMPT, "   "])


# ---------------------------------------------------------------------------------------------------------
# Reward use: gradients through the images
# ---------------------------------------------------------------------------------------------------------

def test_reward_gradient_reaches_the_pixels_the_same_on_kernel_and_twin(scorer, monkeypatch):
    prompts = [PROMPT, "A lone tree on a hill. Snow covers the ground."]
    grads = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("LONGALIGN_KERNELS", mode)
        images = random_images(2, 1).requires_grad_(True)
        parts = scorer.score(images, prompts, omega=0.3)  # V from this batch, as the official code does
        (0.5 * (1 - parts.score.mean())).backward()
        grads[mode] = images.grad
    assert grads["torch"].abs().sum() > 0
    torch.testing.assert_close(grads["triton"], grads["torch"], atol=1e-6, rtol=1e-4)


def test_reward_call_is_the_crop_then_the_projection_with_the_image_gradient(scorer):
    """What the reward stage calls: a random crop of a [0, 1] image tensor, the scorer's image embedding, then
    the score projection against the prompts' segments; the ScoreParts values and the pixel gradient match
    that recipe spelled out step by step, and the crop follows the generator."""
    prompts = [PROMPT, "A lone tree on a hill. Snow covers the ground."]
    direction = F.normalize(torch.randn(scorer.embed_dim, generator=torch.Generator().manual_seed(7)), dim=0)
    pixels = random_images(2, 4)[..., :200, :232]  # not square, so the crop has room to move
    results = []
    for by_hand in (False, True):
        images = pixels.clone().requires_grad_(True)
        generator = torch.Generator().manual_seed(11)
        if by_hand:
            embeddings = scorer.encode_images(images, random_crop=160, generator=generator)
            encoded = scorer.encode_prompts(prompts)
            parts = score_projection(embeddings, encoded.segments, encoded.mask(), direction, 0.3)
        else:
            parts = scorer.score(images, prompts, direction, 0.3, random_crop=160, generator=generator)
        (grad,) = torch.autograd.grad(parts.score.sum(), images)
        results.append((parts, grad))
    (parts, grad), (expected, expected_grad) = results
    assert isinstance(parts, ScoreParts) and grad.abs().sum() > 0
    for name in ScoreParts._fields:
        assert torch.equal(getattr(parts, name), getattr(expected, name)), name
    assert torch.equal(grad, expected_grad)
    other = scorer.score(pixels, prompts, direction, 0.3, random_crop=160, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(other.score, parts.score.detach())  # another seed, another crop


def test_similarities_agree_with_the_score_projection(scorer):
    images = random_images(3, 2)
    prompts = [PROMPT, "A lone tree.", SENTENCES[1]]
    direction = F.normalize(torch.randn(scorer.embed_dim), dim=0)
    encoded = scorer.encode_prompts(prompts)
    with torch.no_grad():
        image_embeddings = scorer.encode_images(images)
    matrices = similarities(encoded.prompt_embedding(), image_embeddings, direction)
    parts = score_projection(image_embeddings, encoded.segments, encoded.mask(), direction, 1.0)
    torch.testing.assert_close(matrices["original"].diagonal(), parts.original)
    torch.testing.assert_close(matrices["relevant"].diagonal(), parts.relevant)


# ---------------------------------------------------------------------------------------------------------
# The common direction V
# ---------------------------------------------------------------------------------------------------------

def test_fit_direction_is_the_normalized_mean_prompt_embedding(scorer):
    prompts = [PROMPT, "A lone tree.", SENTENCES[1], "Snow. Wind. A cabin with a red door."]
    direction = fit_direction(scorer, prompts, batch_size=3, progress=False)
    embeddings = torch.cat([scorer.encode_prompts([p]).prompt_embedding() for p in prompts])
    expected = embeddings.mean(0) / embeddings.mean(0).norm()
    torch.testing.assert_close(direction, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(batch_direction(embeddings), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(common_direction(embeddings), expected, atol=1e-6, rtol=1e-5)


def test_direction_file_round_trip_and_size_check(scorer, tmp_path):
    direction = F.normalize(torch.randn(scorer.embed_dim), dim=0)
    path = tmp_path / "V.safetensors"
    save_direction(path, direction, scorer, num_prompts=7)
    torch.testing.assert_close(load_direction(path, scorer.embed_dim), direction)
    with pytest.raises(WeightsError, match=f"has {scorer.embed_dim} dims .* embeds into 1024"):
        load_direction(path, 1024)
    save_state_dict({"something_else": direction}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="holds no common direction"):
        load_direction(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="common direction has shape"):
        scorer.score(random_images(1, 3), [PROMPT], direction=direction[:-1])


def _gather_worker(rank, world_size, init_file, chunks, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results[rank] = batch_direction(chunks[rank])
    dist.destroy_process_group()


def test_batch_direction_gathers_across_ranks_with_unequal_batches(tmp_path):
    embeddings = torch.randn(7, 16, generator=torch.Generator().manual_seed(4)) + 1.0
    chunks = [embeddings[:2], embeddings[2:]]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), chunks, results), nprocs=2)
        for rank in range(2):
            torch.testing.assert_close(results[rank], common_direction(embeddings))


# ---------------------------------------------------------------------------------------------------------
# Scorer kinds
# ---------------------------------------------------------------------------------------------------------

def test_kind_inference():
    assert infer_kind("whatever/HPS_v2.pt", "open_clip").name == "hpsv2"
    assert infer_kind("ckpt/open_clip_model.safetensors", "open_clip").name == "hpsv2"
    assert infer_kind("hub/PickScore_v1", "transformers").name == "pickscore"
    assert infer_kind("hub/Denscore", "transformers").name == "denscore"
    assert infer_kind("hub/CLIP-ViT-H-14", "transformers").name == "clip"
    assert infer_kind("hub/PickScore_v1", "transformers", kind="hpsv2").name == "hpsv2"  # the flag wins
    assert KINDS["hpsv2"].pad_to_square and not KINDS["pickscore"].pad_to_square
    with pytest.raises(ValueError, match="unknown scorer kind 'pick'"):
        infer_kind("x", "transformers", kind="pick")


# ---------------------------------------------------------------------------------------------------------
# Retrieval (Tables 1 and 4)
# ---------------------------------------------------------------------------------------------------------

def test_retrieval_is_perfect_when_embeddings_are_built_to_match():
    """Image i is text i plus small noise, at a random scale: both rows must reach R@1 = 100%."""
    gen = torch.Generator().manual_seed(5)
    texts = F.normalize(torch.randn(50, 32, generator=gen), dim=-1)
    images = (texts + 0.05 * torch.randn(50, 32, generator=gen)) * torch.rand(50, 1, generator=gen).add(0.5)
    direction = common_direction(texts)
    scores = similarities(texts, images, direction)
    assert recall_at_1(scores["original"]) == 100.0
    assert recall_at_1(scores["relevant"]) == 100.0
    assert recall_at_1(scores["original"][torch.randperm(50, generator=gen)]) < 20.0  # the metric can fail


def test_removing_the_common_direction_fixes_retrieval_it_dominates():
    """The paper's point (§4): texts share a large component along V, and images differ mostly in how much
    of V they show. The original score then ranks by "V-ness"; the text-relevant score ranks by content."""
    gen = torch.Generator().manual_seed(6)
    count, width = 40, 48
    basis, _ = torch.linalg.qr(torch.randn(width, count + 1, generator=gen))  # orthonormal columns
    v, content = basis[:, 0], basis[:, 1:].T  # one content direction per pair, all ⊥ V and to each other
    texts = 0.4 * content + 0.9 * v  # η = 0.9, like PickScore (the paper's Figure 2(b))
    v_amount = torch.logspace(-2, 0.5, count)  # images show 0.01 .. 3.2 of V
    images = 0.3 * content + v_amount[:, None] * v
    scores = similarities(texts, images, v)
    assert recall_at_1(scores["relevant"]) == 100.0
    assert recall_at_1(scores["original"]) < 60.0  # the faint-V images lose to the strong-V ones


def test_recall_table_has_both_rows_for_every_column():
    gen = torch.Generator().manual_seed(8)
    texts = F.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    images = texts + 0.01 * torch.randn(20, 16, generator=gen)
    shuffled = texts[torch.randperm(20, generator=gen)]
    table = recall_table({"single": shuffled, "average": texts}, images, common_direction(texts))
    assert table["original"]["average"] == table["relevant"]["average"] == 100.0
    assert table["original"]["single"] < 30.0  # the metric can fail
    assert table["original"]["single"] == recall_at_1(similarities(shuffled, images)["original"])


def test_prompt_embeddings_batch_by_batch_equal_one_pass(scorer):
    prompts = [PROMPT, "A lone tree.", SENTENCES[1], "Snow. Wind. A cabin with a red door."]
    columns = prompt_embeddings(scorer, prompts, max_sentences=[None, 1], batch_size=3)
    encoded = scorer.encode_prompts(prompts)
    torch.testing.assert_close(columns[None], encoded.prompt_embedding(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(columns[1], encoded.prompt_embedding(1), atol=1e-6, rtol=1e-5)
    single = prompt_embeddings(scorer, prompts, single=True)[None]
    torch.testing.assert_close(single, scorer.encode_prompts(prompts, single=True).prompt_embedding())


def test_find_direction_looks_beside_the_scorer(scorer, tmp_path):
    direction = F.normalize(torch.randn(scorer.embed_dim), dim=0)
    folder = tmp_path / "scorer"
    folder.mkdir()
    assert find_direction(None, folder, scorer.embed_dim) is None  # none there: no split
    save_direction(folder / DIRECTION_FILE, direction, scorer, num_prompts=3)
    torch.testing.assert_close(find_direction(None, folder, scorer.embed_dim), direction)
    torch.testing.assert_close(find_direction(None, folder / "model.safetensors", scorer.embed_dim), direction)
    save_direction(tmp_path / "V.safetensors", -direction, scorer, num_prompts=3)
    torch.testing.assert_close(find_direction(tmp_path / "V.safetensors", folder, scorer.embed_dim), -direction)
    with pytest.raises(WeightsError, match="embeds into 7"):
        find_direction(None, folder, 7)


def test_encoded_prompts_mask_counts_sentences():
    encoded = EncodedPrompts(torch.zeros(2, 4, 3), torch.tensor([[0, 0, 1, 2], [0, 1, -1, -1]]))
    assert encoded.mask(1).tolist() == [[True, True, False, False], [True, False, False, False]]
    assert encoded.segments_used().tolist() == [4, 2]

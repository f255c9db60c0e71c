"""Twig training: grow, learn a synthetic task on a frozen tiny LLaVA, distillation, resume, data checks, outputs."""

import json
import logging
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration, TrainerCallback

from tiny_llava_data import COLOURS, NUMBERS, colour_task, conversation, tiny_processor, write_records
from tiny_models import NUM_IMAGE_TOKENS, llava_with_same_base, tiny_config, tiny_twigvlm
from twigvlm import TwigVLMForConditionalGeneration
from twigvlm.training import (
    BadRecordError,
    LlavaConversationDataset,
    ModalityLengthGroupedSampler,
    TwigDataCollator,
    TwigTrainer,
    TwigTrainingArguments,
    TwigVLMForTwigTraining,
    distillation_kl,
    grow_twig,
    load_model_for_training,
)
from twigvlm.training.cli import main as train_main
from twigvlm.training.data import expand_to_square


CONFIG_DIR = Path(__file__).parents[1] / "training" / "configs"
TRAIN_STEPS, LEARNING_RATE = 300, 1e-3


def training_model(seed: int = 0) -> TwigVLMForTwigTraining:
    """The tiny random LLaVA of the other tests as a training model, with a freshly grown twig."""
    config = tiny_config()
    model = TwigVLMForTwigTraining(config)
    model.load_state_dict(tiny_twigvlm(config, seed=seed).state_dict())
    model.set_attn_implementation("sdpa")
    grow_twig(model)
    return model


def training_args(output_dir: Path, **overrides) -> TwigTrainingArguments:
    fields = dict(
        output_dir=str(output_dir),
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=8,
        global_batch_size=8,
        learning_rate=LEARNING_RATE,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    fields.update(overrides)
    return TwigTrainingArguments(**fields)


def twig_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if name.startswith("model.twig.")}


def base_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if not name.startswith("model.twig.")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared CPU the threads' spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    return folder, colour_task(folder, 256, seed=1), colour_task(folder, 64, seed=2)


def answer_accuracy(model, processor, image_folder, records) -> tuple[float, float]:
    """Greedy next-token accuracy of the twig on held-out answer words (EOS left out), and that of a uniform guess."""
    dataset = LlavaConversationDataset(records, processor, image_folder=image_folder)
    collate = TwigDataCollator(processor.tokenizer.pad_token_id)
    eos = processor.tokenizer.eos_token_id
    vocabulary = processor.tokenizer.convert_ids_to_tokens
    correct = total = chance = 0.0
    model.eval()
    with torch.no_grad():
        batch = collate([dataset[i] for i in range(len(dataset))])
        logits = model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values")).logits
    targets = batch["labels"][:, 1:]
    answers = (targets != -100) & (targets != eos)
    correct = (logits[:, :-1].argmax(-1)[answers] == targets[answers]).float().mean().item()
    for word in vocabulary(targets[answers].tolist()):
        choices = len(COLOURS) if word in COLOURS else len(NUMBERS) if word in NUMBERS else 2  # colour, digit, yes/no
        chance += 1 / choices
        total += 1
    return correct, chance / total


@pytest.fixture(scope="module")
def trained(task, processor, tmp_path_factory):
    image_folder, train_records, test_records = task
    model = training_model()
    before = {"twig": twig_state(model), "base": base_state(model)}
    accuracy_before, chance = answer_accuracy(model, processor, image_folder, test_records)
    dataset = LlavaConversationDataset(train_records, processor, image_folder=image_folder)
    args = training_args(tmp_path_factory.mktemp("run"), max_steps=TRAIN_STEPS, logging_steps=1)
    trainer = TwigTrainer(model=model, args=args, train_dataset=dataset, data_collator=TwigDataCollator(0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    accuracy_after, _ = answer_accuracy(model, processor, image_folder, test_records)
    return dict(
        trainer=trainer,
        model=model,
        before=before,
        losses=losses,
        chance=chance,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
    )


def test_grow_copies_base_layers_norm_and_head():
    model = training_model()
    k, base = model.config.twig_attach_layer, model.model.language_model
    for i, layer in enumerate(model.model.twig.layers):
        for (name, twig_param), base_param in zip(
            layer.state_dict().items(), base.layers[k + i].state_dict().values()
        ):
            assert torch.equal(twig_param, base_param), name
    assert torch.equal(model.model.twig.norm.weight, base.norm.weight)
    assert torch.equal(model.model.twig.lm_head.weight, model.lm_head.weight)


def test_training_learns_the_task(trained):
    first, last = sum(trained["losses"][:10]) / 10, sum(trained["losses"][-10:]) / 10
    print(
        f"\n{TRAIN_STEPS} steps, lr {LEARNING_RATE}: loss {first:.3f} (first 10 steps) -> {last:.3f} (last 10); "
        f"held-out answer accuracy {trained['accuracy_before']:.3f} -> {trained['accuracy_after']:.3f} (chance "
        f"{trained['chance']:.3f})"
    )
    assert last < first / 5
    assert trained["accuracy_after"] > 0.9 > 2 * trained["chance"]
    assert trained["accuracy_before"] < trained["chance"] + 0.1


def test_only_the_twig_changes_and_is_optimized(trained):
    model, before = trained["model"], trained["before"]
    for name, tensor in base_state(model).items():
        assert torch.equal(tensor, before["base"][name]), f"frozen {name} changed"
    for name, tensor in twig_state(model).items():
        assert not torch.equal(tensor, before["twig"][name]), f"twig {name} did not train"
    optimized = {id(p) for group in trained["trainer"].optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.model.twig.parameters()}
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith("model.twig."))


def batch_of(records, processor, image_folder):
    dataset = LlavaConversationDataset(records, processor, image_folder=image_folder)
    return TwigDataCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("distill", [False, True])
def test_training_forward_runs_shallow_layers_and_twig_only(task, processor, distill):
    image_folder, records, _ = task
    model = training_model().train()
    model.freeze_base()
    model.distill_alpha = 0.1 if distill else 0.0
    batch = batch_of(records[:4], processor, image_folder)
    k, layers = model.config.twig_attach_layer, model.model.language_model.layers
    calls = [0] * len(layers)

    def count(i, grad_expected):
        def hook(module, args, output):
            calls[i] += 1
            # The frozen base builds no graph: it keeps no activations for the backward pass.
            assert output.requires_grad is grad_expected

        return hook

    handles = [layer.register_forward_hook(count(i, False)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(count(-1, True)) for layer in model.model.twig.layers]
    outputs = model(**batch)
    outputs.loss.backward()
    for handle in handles:
        handle.remove()
    assert calls[:k] == [2 if distill else 1] * k  # the teacher reruns them on the same embeddings
    assert calls[k:-1] == [1 if distill else 0] * (len(layers) - k - 1)

    # Same logits as the inference model's shallow path, at the supervised positions and everywhere.
    inference = TwigVLMForConditionalGeneration(model.config).eval()
    inference.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        reference = inference.twig_forward(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        supervised = batch["labels"][:, 1:] != -100
        assert torch.allclose(model(**batch).logits, reference[:, :-1][supervised], atol=1e-5)
        full = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        assert torch.allclose(full, reference, atol=1e-5)


def test_distillation_loss_equals_hand_computation(task, processor):
    student = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.3, 2.5, 1.0]]
    teacher = [[2.0, 0.0, 1.0, 0.5], [1.5, -0.5, 2.0, 0.0]]
    temperature = 5.0

    def softmax(row):
        exps = [math.exp(x / temperature) for x in row]
        return [e / sum(exps) for e in exps]

    expected = [
        temperature**2 * sum(p * math.log(p / q) for p, q in zip(softmax(t), softmax(s)))
        for s, t in zip(student, teacher)
    ]
    ours = distillation_kl(torch.tensor(student), torch.tensor(teacher), temperature)
    assert torch.allclose(ours, torch.tensor(expected), atol=1e-7)

    # The model's loss: mean next-token loss + α·mean KL from the full base model to the twig, on answer tokens.
    image_folder, records, _ = task
    model = training_model()
    model.distill_alpha, model.distill_temperature = 0.1, temperature
    batch = batch_of(records[:3], processor, image_folder)
    inference = TwigVLMForConditionalGeneration(model.config).eval()
    inference.load_state_dict(model.state_dict())
    with torch.no_grad():
        outputs = model(**batch)
        twig_logits = inference.twig_forward(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        base_logits = inference(**{k: v for k, v in batch.items() if k != "labels"}, token_reduction="none").logits
    targets, supervised = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    twig_logits, base_logits = twig_logits[:, :-1][supervised], base_logits[:, :-1][supervised]
    ntp = torch.nn.functional.cross_entropy(twig_logits, targets[supervised])
    p_base = torch.softmax(base_logits / temperature, -1)
    kl = (p_base * (p_base.log() - torch.log_softmax(twig_logits / temperature, -1))).sum(-1).mean() * temperature**2
    assert torch.allclose(outputs.ntp_loss, ntp, atol=1e-6)
    assert torch.allclose(outputs.distill_loss, kl, atol=1e-6)
    assert torch.allclose(outputs.loss, ntp + 0.1 * kl, atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_equals_straight_run(task, processor, tmp_path):
    image_folder, records, _ = task
    dataset = LlavaConversationDataset(records[:64], processor, image_folder=image_folder)
    steps = 4

    def run(output_dir, callbacks=(), resume=None):
        model = training_model()
        args = training_args(
            output_dir,
            max_steps=2 * steps,
            per_device_train_batch_size=2,
            global_batch_size=4,
            logging_steps=1,
            save_strategy="steps",
            save_steps=steps,
        )
        trainer = TwigTrainer(
            model=model, args=args, train_dataset=dataset, data_collator=TwigDataCollator(0), callbacks=list(callbacks)
        )
        trainer.train(resume_from_checkpoint=resume)
        losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
        return losses, twig_state(model)

    straight, straight_twig = run(tmp_path / "straight")
    first, _ = run(tmp_path / "resumed", callbacks=[StopAt(steps)])
    checkpoint = tmp_path / "resumed" / f"checkpoint-{steps}"
    saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
    assert set(saved) == set(straight_twig)  # checkpoints hold the twig alone
    second, resumed_twig = run(tmp_path / "resumed", resume=str(checkpoint))
    assert sorted(first) == list(range(1, steps + 1))
    second = {step: loss for step, loss in second.items() if step > steps}  # the log history restored holds the first
    assert sorted(second) == list(range(steps + 1, 2 * steps + 1))
    for step, loss in {**first, **second}.items():
        assert loss == pytest.approx(straight[step], abs=1e-5), step
    for name, tensor in resumed_twig.items():
        assert torch.allclose(tensor, straight_twig[name], atol=1e-6), name


def test_labels_cover_the_assistant_answers_only(task, processor):
    image_folder, _, _ = task
    Path(image_folder / "wide.png").parent.mkdir(exist_ok=True)
    from PIL import Image

    Image.new("RGB", (60, 20), (220, 30, 30)).save(image_folder / "wide.png")
    record = conversation(
        "two-turns", [("what colour is the image ? <image>", "red"), ("is the image red ?", "yes")], image="wide.png"
    )
    item = LlavaConversationDataset([record], processor, image_folder=image_folder)[0]
    tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    supervised = [tokens[i] for i, label in enumerate(item["labels"].tolist()) if label != -100]
    assert supervised == ["red", "</s>", "yes", "</s>"]
    assert torch.equal(item["labels"][item["labels"] != -100], item["input_ids"][item["labels"] != -100])
    # The placeholder moved to the start of its turn and the processor expanded it to the image's tokens.
    start = tokens.index("<image>")
    assert tokens[start - 2 : start] == ["USER", ":"] and tokens.count("<image>") == NUM_IMAGE_TOKENS
    assert item["pixel_values"].shape == (3, 56, 56)

    # As LLaVA: a leading assistant turn and a last unanswered question are dropped; the image may sit in a later turn.
    record["conversations"] = (
        [{"from": "gpt", "value": "no"}]
        + record["conversations"][2:]
        + record["conversations"][:2]
        + [{"from": "human", "value": "what colour ?"}]
    )
    item = LlavaConversationDataset([record], processor, image_folder=image_folder)[0]
    tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert [tokens[i] for i, label in enumerate(item["labels"].tolist()) if label != -100] == [
        "yes",
        "</s>",
        "red",
        "</s>",
    ]
    assert tokens[-1] == "</s>" and tokens.count("<image>") == NUM_IMAGE_TOKENS

    square = expand_to_square(Image.new("RGB", (60, 20), (255, 0, 0)), (1, 2, 3))
    assert (
        square.size == (60, 60) and square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((30, 30)) == (255, 0, 0)
    )


def test_max_length_truncates_text_and_refuses_to_cut_the_image(task, processor):
    image_folder, records, _ = task
    text_record = next(record for record in records if "image" not in record)
    assert len(LlavaConversationDataset([text_record], processor, max_length=12)[0]["input_ids"]) == 12
    image_record = next(record for record in records if "image" in record)
    dataset = LlavaConversationDataset([image_record], processor, image_folder=image_folder, max_length=40)
    with pytest.raises(BadRecordError, match="Record 0 .*image tokens end beyond max_length=40"):
        dataset[0]


BAD_RECORDS = {
    "missing image file": (dict(image="absent.png"), "names image file 'absent.png', which is not in"),
    "placeholder mismatch": (
        dict(drop_placeholder=True),
        r"has one image but 0 <image> placeholders \(per turn: \[0, 0\]\)",
    ),
    "empty conversation": (dict(empty=True), "has an empty conversation"),
}


def bad_record(image_folder, kind: str) -> dict:
    change, _ = BAD_RECORDS[kind]
    record = conversation("bad", [("<image>\nwhat colour is the image ?", "red")], image="wide.png")
    if "image" in change:
        record["image"] = change["image"]
    if change.get("drop_placeholder"):
        record["conversations"][0]["value"] = "what colour is the image ?"
    if change.get("empty"):
        record["conversations"] = []
    return record


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_records_stop_with_a_clear_error_or_are_skipped_and_counted(task, processor, kind, caplog):
    image_folder, records, _ = task
    from PIL import Image

    Image.new("RGB", (60, 20), (220, 30, 30)).save(image_folder / "wide.png")
    data = records[:5] + [bad_record(image_folder, kind)] + records[5:10] + [bad_record(image_folder, kind)]
    with pytest.raises(BadRecordError, match=rf"Record 5 \(id 'bad'\) {BAD_RECORDS[kind][1]}.*--skip_bad_records"):
        LlavaConversationDataset(data, processor, image_folder=image_folder)
    with caplog.at_level(logging.WARNING):
        dataset = LlavaConversationDataset(data, processor, image_folder=image_folder, skip_bad_records=True)
    assert len(dataset) == 10 and dataset.num_skipped == 2 and dataset.skipped == {kind: 2}
    assert f"Skipped 2 of 12 records as malformed ({kind}: 2; first: Record 5 (id 'bad')" in caplog.text


def test_group_by_modality_length(task):
    has_image = [i % 3 != 0 for i in range(50)]
    lengths = [(7 * i) % 23 for i in range(50)]
    sampler = ModalityLengthGroupedSampler(lengths, has_image, group_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(50)) and order == list(sampler)
    groups = [order[i : i + 8] for i in range(0, len(order), 8)]
    full = [group for group in groups[:-2]]  # the last two hold the leftovers of both modalities
    for group in full:
        assert len({has_image[i] for i in group}) == 1
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_gradient_checkpointing_gives_the_same_gradients(task, processor):
    image_folder, records, _ = task
    batch = batch_of(records[:4], processor, image_folder)
    gradients = []
    for checkpointing in (False, True):
        model = training_model().train()
        model.freeze_base()
        if checkpointing:  # `activation_checkpointing_enable` since transformers 5.18
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model(**batch).loss.backward()
        gradients.append([p.grad for p in model.model.twig.parameters()])
    for plain, checkpointed in zip(*gradients):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


def save_tiny_llava(folder: Path, legacy_layout: bool = False) -> LlavaForConditionalGeneration:
    """A llava-hf checkpoint of the tiny base, in the transformers-5 or the transformers-4 key layout."""
    llava = llava_with_same_base(tiny_twigvlm())
    llava.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    if legacy_layout:
        renames = {
            "model.language_model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
        }
        state = {}
        for name, tensor in llava.state_dict().items():
            old, new = next((old, new) for old, new in renames.items() if name.startswith(old))
            state[new + name.removeprefix(old)] = tensor.contiguous()
        safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return llava


@pytest.mark.parametrize("legacy_layout", [False, True])
def test_load_grows_a_twig_on_llava_hf_checkpoints(tmp_path, legacy_layout):
    llava = save_tiny_llava(tmp_path, legacy_layout)
    model = load_model_for_training(
        str(tmp_path), model_class=TwigVLMForTwigTraining, dtype=torch.float32, num_twig_layers=3, final_wipe_layer=6
    )
    assert model.config.num_twig_layers == 3 and len(model.model.twig.layers) == 3
    expected = llava.state_dict()
    for name, tensor in base_state(model).items():
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(
        model.model.twig.layers[0].mlp.up_proj.weight, model.model.language_model.layers[2].mlp.up_proj.weight
    )


def test_command_trains_and_writes_twig_authors_layout_and_full_model(task, tmp_path):
    image_folder, records, _ = task
    llava = save_tiny_llava(tmp_path / "llava")
    data = write_records(tmp_path / "data.json", records[:24])
    out = tmp_path / "out"
    train_main(
        [
            "--model_name_or_path",
            str(tmp_path / "llava"),
            "--data_path",
            str(data),
            "--image_folder",
            str(image_folder),
            "--output_dir",
            str(out),
            "--twig_attach_layer",
            "2",
            "--num_twig_layers",
            "2",
            "--final_wipe_layer",
            "6",
            "--per_device_train_batch_size",
            "2",
            "--global_batch_size",
            "4",
            "--max_steps",
            "3",
            "--bf16",
            "False",
            "--use_cpu",
            "--save_strategy",
            "no",
            "--dataloader_num_workers",
            "0",
            "--distill",
            "--save_authors_layout",
            "--save_full_model",
            "--disable_tqdm",
            "True",
        ]
    )
    twig = safetensors.torch.load_file(out / "twig.safetensors")
    assert {name.split(".")[2] for name in twig} == {"layers", "norm", "lm_head"}
    authors = safetensors.torch.load_file(out / "twig_authors_layout" / "model.safetensors")
    assert set(authors) == {
        name.replace("model.twig.layers.", "model.layers.")
        .replace("model.twig.norm.", "model.norm.")
        .replace("model.twig.lm_head.", "lm_head.")
        for name in twig
    }
    # Over the original vocabulary, as the authors release it: the rows from `<image>` (119) on are cut off.
    assert torch.equal(authors["lm_head.weight"], twig["model.twig.lm_head.weight"][:119])

    model = TwigVLMForConditionalGeneration.from_pretrained(out / "twigvlm")
    assert AutoProcessor.from_pretrained(out / "twigvlm").tokenizer.convert_tokens_to_ids("<image>") == 119
    state = model.state_dict()
    for name, tensor in llava.state_dict().items():
        assert torch.equal(state[name], tensor), name
    for name, tensor in twig.items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(twig["model.twig.lm_head.weight"], llava.lm_head.weight)  # trained, not the grown copy
    generation_config = GenerationConfig.from_pretrained(out / "twigvlm")  # as conversion writes it
    assert generation_config.suppress_tokens == [119] and generation_config.assistant_early_exit == 2
    assert json.loads((out / "twigvlm" / "config.json").read_text())["architectures"] == [
        "TwigVLMForConditionalGeneration"
    ]


def test_example_launch_configs_parse():
    for path in CONFIG_DIR.glob("*.json"):
        assert json.loads(path.read_text())["zero_optimization"]["stage"] in (2, 3)
    accelerate_configs = list(CONFIG_DIR.glob("*.yaml"))
    assert accelerate_configs
    for path in accelerate_configs:
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")
        deepspeed_file = config.get("deepspeed_config", {}).get("deepspeed_config_file")
        if deepspeed_file:
            assert (CONFIG_DIR.parents[1] / deepspeed_file).is_file(), deepspeed_file

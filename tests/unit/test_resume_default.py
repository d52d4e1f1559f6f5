"""``load`` defaults to ``save`` once ``save`` holds a checkpoint; an explicit ``load`` wins."""

from neox.config import NeoXArgs
from neox.training.pretrain import resume_from_save

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, max_position_embeddings=32,
            padded_vocab_size=128, train_micro_batch_size_per_gpu=1, train_iters=2, num_gpus=1,
            tokenizer_type="CharLevelTokenizer")


def _args(**kw) -> NeoXArgs:
    return NeoXArgs.from_flat({**BASE, **kw}, world_size=1)


def test_load_defaults_to_save_only_with_a_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    args = _args(save=str(save))
    assert resume_from_save(args) is args  # no directory yet
    save.mkdir()
    assert resume_from_save(args) is args  # directory without `latest`
    (save / "latest").write_text("global_step2")
    assert resume_from_save(args).checkpoint.load == str(save)


def test_explicit_load_and_remote_save_are_kept(tmp_path):
    (tmp_path / "latest").write_text("global_step2")
    other = str(tmp_path / "base")
    args = _args(save=str(tmp_path), load=other, finetune=True)
    assert resume_from_save(args).checkpoint.load == other
    assert resume_from_save(_args()).checkpoint.load is None

"""`vlmtune chat` with its input piped (not a terminal), as a script would use it, and `--help` examples."""

from __future__ import annotations

import io

import pytest

from vlmtune.checkpoint.source import resolve_source
from vlmtune.cli import main
from vlmtune.infer import Generator, Sampling


def test_piped_chat_answers_each_turn_with_the_image(vlm_run, image_file, one_thread, monkeypatch, capsys):
    run = vlm_run("llava")
    script = f"/image {image_file}\nWhat is this?\nAnd now?\n"  # ends without /exit: end of input ends it
    monkeypatch.setattr("sys.stdin", io.StringIO(script))  # not a terminal, as when piped
    assert main(["chat", str(run), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    captured = capsys.readouterr()

    greedy = Sampling(max_new_tokens=6)
    generator = Generator(resolve_source(run), device="cpu")
    image = generator.open_image(image_file)
    turn1 = [generator.user_message("What is this?", images=1)]
    first = generator.reply(turn1, [image], greedy)
    turn2 = [*turn1, {"role": "assistant", "content": [{"type": "text", "text": first}]}]
    second = generator.reply([*turn2, generator.user_message("And now?")], [image], greedy)
    assert captured.out == f"{first}\n{second}\n"
    assert "(image attached" in captured.err and "> " not in captured.err  # no prompts when piped


@pytest.mark.parametrize("command", ["merge", "generate", "chat"])
def test_help_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"vlmtune {command} runs/" in capsys.readouterr().out

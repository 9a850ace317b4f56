#!/usr/bin/env python3
"""Make the tokenizer and chat-template reference fixtures of braid-models.

Every expected value here comes from Hugging Face `tokenizers` / `transformers` (and the
`gguf` writer llama.cpp uses), never from Braid, so the Rust tests compare against an
independent reference.

Run from the repository root in a venv:
    python3 -m venv .venv
    .venv/bin/pip install tokenizers transformers sentencepiece protobuf gguf numpy jinja2
    .venv/bin/python scripts/make_tokenizer_fixtures.py

Writes braid-models/tests/fixtures/tokenizer/:
    byte_level/tokenizer.json   a small byte-level BPE trained here (vocab 400)
    byte_level.gguf             the same vocabulary as llama.cpp's converter writes it ("gpt2")
    sentencepiece/tokenizer.json  transformers' LlamaTokenizerFast (legacy=False) of a small
                                SentencePiece BPE model with byte fallback (vocab 480, 256 of
                                them byte pieces)
    sentencepiece.gguf          that SentencePiece vocabulary as a "llama" GGUF vocabulary
    cases.json                  texts with the ids and decoded strings transformers gives
    chat_templates.json         real chat templates with what apply_chat_template renders
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "braid-models" / "tests" / "fixtures" / "tokenizer"

# A small, fixed training corpus: English prose, code, numbers, accented Latin, CJK and emoji,
# so both vocabularies hold multi-byte pieces as well as ASCII ones.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "A tokenizer splits text into pieces, and each piece has an id in the vocabulary.",
    "Language models read token ids and predict the next token, one step at a time.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "The year 2024 had 366 days; 12345 + 67890 = 80235. Call 555-0199 at 9:30.",
    "Prices: $4.99, €12.50, £3.00 and 100% of the time it works 50% of the time.",
    "Café, naïve, résumé, façade, Zürich, São Paulo, Ångström, élève, über, señor.",
    "Les élèves étudient à l'école; ¿Dónde está la biblioteca? Ça va très bien.",
    "你好，世界！今天天气很好。我们在学习语言模型。",
    "日本語のテキストも少し入れます。こんにちは、世界。",
    "안녕하세요 세계. Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "Emoji too: 😀 🚀 🎉 👍🏽 ❤️ and a family 👨‍👩‍👧.",
    "Whitespace   matters:  two spaces, three   spaces, a tab\there, and\nnew\nlines.",
    "The assistant answered the user's question, then the user asked another one.",
    "It's a test; we're sure they'll see what I've done and you'd agree.",
    "Inference engines batch requests, cache keys and values, and stream tokens back.",
]

# Texts whose encoding both tokenizers must reproduce exactly.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "multiple   spaces    here",
    "  two leading and two trailing  ",
    "line one\nline two\n\nline four",
    "\n",
    "\n\n\n",
    "tab\tseparated\tvalues",
    "12345",
    "3.14159 and 2024-11-26",
    "Café naïve résumé Zürich",
    "你好世界",
    "こんにちは",
    "emoji 😀🚀 and 👍🏽",
    "mixed: héllo 世界 🎉!",
    "It's they'll we've I'M",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "before<|endoftext|>after",
    "a <think>inner</think> b",
    "",
    " ",
    "   ",
    "x",
    "unseen words: zyxwvut qqq",
    "use <tool> now",
    "abc123456def 1234567",
    "x  \n  y\r\nz",
    "  \n\n  hi",
    "DON'T SHOUT, it's fine; HE'LL see",
    "tabs\t\t\tand spaces \t mixed",
    "e\u0301 composed vs \u00e9 precomposed",
]

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A non-special added token: llama.cpp writes it as USER_DEFINED (token type 4).
BYTE_LEVEL_USER_TOKEN = "<think>"
BYTE_LEVEL_USER_TOKEN_2 = "</think>"

# The pre-tokenizers of real tokenizer.json files, keyed by the `tokenizer.ggml.pre` name that
# llama.cpp gives them; the Rust side must choose the same one from the GGUF `pre` value.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_VARIANTS = {
    # SmolLM2's tokenizer.json
    "smollm": {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "ignore_merges": False,
    },
    # Meta-Llama-3's tokenizer.json
    "llama-bpe": {
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "ignore_merges": True,
    },
    # Qwen2 / Qwen2.5 / Qwen3's tokenizer.json
    "qwen2": {
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "ignore_merges": False,
    },
}


def encode_cases(tok, texts: list[str], with_bos: bool) -> list[dict]:
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        case = {
            "text": text,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        }
        if with_bos:
            case["ids_with_special"] = tok.encode(text, add_special_tokens=True)
        cases.append(case)
    return cases


def make_byte_level(cases: dict) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=1,
        special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([
        AddedToken(BYTE_LEVEL_USER_TOKEN, special=False, normalized=False),
        AddedToken(BYTE_LEVEL_USER_TOKEN_2, special=False, normalized=False),
    ])
    out_dir = OUT / "byte_level"
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(out_dir / "tokenizer.json"),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token=None,
    )
    cases["byte_level"] = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "vocab_size": len(hf),
        "cases": encode_cases(hf, TEXTS, with_bos=False),
    }

    # Same vocabulary, merges and added tokens under each real pre-tokenizer.
    base = json.loads((out_dir / "tokenizer.json").read_text())
    variants = {}
    for pre, parts in PRE_VARIANTS.items():
        spec = json.loads(json.dumps(base))
        spec["normalizer"] = parts["normalizer"]
        spec["pre_tokenizer"] = parts["pre_tokenizer"]
        spec["model"]["ignore_merges"] = parts["ignore_merges"]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            path.write_text(json.dumps(spec))
            variant = PreTrainedTokenizerFast(tokenizer_file=str(path))
            variants[pre] = encode_cases(variant, TEXTS, with_bos=False)
    cases["byte_level_pre"] = variants

    # The GGUF vocabulary, written the way llama.cpp's convert_hf_to_gguf.py does for a BPE
    # tokenizer: tokens by id, added special tokens as CONTROL, other added tokens as
    # USER_DEFINED, merges as "left right" strings.
    vocab = hf.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = hf.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(by_id)):
        token = by_id[i]
        tokens.append(token)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in base["model"]["merges"]]
    writer = gguf.GGUFWriter(str(OUT / "byte_level.gguf"), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_sentencepiece(cases: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus_file = tmp / "corpus.txt"
        corpus_file.write_text("\n".join(CORPUS) + "\n")
        # The options of LLaMA's own tokenizer.model: BPE, byte fallback, digits split, no
        # normalisation, whitespace kept as it is.
        spm.SentencePieceTrainer.train(
            input=str(corpus_file),
            model_prefix=str(tmp / "tokenizer"),
            model_type="bpe",
            vocab_size=480,
            byte_fallback=True,
            split_digits=True,
            character_coverage=0.98,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            control_symbols=["<|im_start|>", "<|im_end|>"],
            user_defined_symbols=["<tool>"],
            num_threads=1,
            shuffle_input_sentence=False,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        hf_dir = tmp / "hf"
        hf_dir.mkdir()
        shutil.copy(tmp / "tokenizer.model", hf_dir / "tokenizer.model")
        hf = LlamaTokenizerFast.from_pretrained(str(hf_dir), legacy=False, add_bos_token=True)
        save_dir = tmp / "saved"
        hf.save_pretrained(str(save_dir))
        out_dir = OUT / "sentencepiece"
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(save_dir / "tokenizer.json", out_dir / "tokenizer.json")

        cases["sentencepiece"] = {
            "bos_token": hf.bos_token,
            "eos_token": hf.eos_token,
            "vocab_size": len(hf),
            "cases": encode_cases(hf, TEXTS, with_bos=True),
        }

        # The GGUF vocabulary as llama.cpp writes a SentencePiece model: pieces, scores and
        # piece types, with no merges (readers derive them from the scores).
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((tmp / "tokenizer.model").read_bytes())
        type_map = {
            proto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
            proto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
            proto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
            proto.SentencePiece.USER_DEFINED: gguf.TokenType.USER_DEFINED,
            proto.SentencePiece.UNUSED: gguf.TokenType.UNUSED,
            proto.SentencePiece.BYTE: gguf.TokenType.BYTE,
        }
        writer = gguf.GGUFWriter(str(OUT / "sentencepiece.gguf"), arch="llama")
        writer.add_tokenizer_model("llama")
        writer.add_token_list([p.piece for p in proto.pieces])
        writer.add_token_scores([p.score for p in proto.pieces])
        writer.add_token_types([type_map[p.type] for p in proto.pieces])
        writer.add_bos_token_id(proto.trainer_spec.bos_id)
        writer.add_eos_token_id(proto.trainer_spec.eos_id)
        writer.add_unk_token_id(proto.trainer_spec.unk_id)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.1
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Qwen3's tokenizer_config.json
QWEN3_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# Exercises what HF templates lean on beyond the four above: Python string methods, tojson,
# namespace, loop controls, slicing, filters, whitespace control and trim/lstrip_blocks.
FEATURES_TEMPLATE = """{%- set ns = namespace(count=0, roles=[]) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- set ns.roles = ns.roles + [message.role] %}
{{ loop.index }}/{{ loop.length }} {{ message.role | upper }}: {{ message.content.strip() | tojson }}
    {%- if message.content.startswith('Hi') %} (greeting){% endif %}
    {%- if loop.last %}{% break %}{% endif %}
{% endfor %}
words={{ messages[-1]['content'].split() | length }} title={{ messages[0]['content'].title() }}
count={{ ns.count }} roles={{ ns.roles | join(',') }} first={{ messages[:1] | map(attribute='role') | list | tojson }}
{% if bos_token is defined %}bos={{ bos_token }}{% endif %} replaced={{ messages[-1].content.replace(' ', '_') | lower }}
{{ {'b': 1, 'a': [1, 2.5, none, true], 'c': 'é"<x>'} | tojson }}
{{ {'b': 1, 'a': 'x'} | tojson(indent=2) }}
{%- if add_generation_prompt %}
[gen]
{%- endif %}
"""

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello, who are you?"}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Tell me a joke.  "},
    ],
    "with_thinking": [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 6*7?"},
        {"role": "assistant", "content": "<think>\nSix times seven.\n</think>\n\nIt is 42."},
        {"role": "user", "content": "And 7*8?"},
    ],
    "assistant_last_with_thinking": [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nHi!"},
    ],
    "unicode": [{"role": "user", "content": "Grüße aus Zürich 🇨🇭 — 你好"}],
}

TEMPLATE_CASES = [
    ("smollm2", SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>",
     ["single_user", "with_system", "multi_turn", "unicode"]),
    ("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>",
     ["single_user", "with_system", "multi_turn", "unicode"]),
    ("qwen3", QWEN3_TEMPLATE, None, "<|im_end|>",
     ["single_user", "with_system", "multi_turn", "with_thinking", "assistant_last_with_thinking", "unicode"]),
    ("mistral", MISTRAL_TEMPLATE, "<s>", "</s>", ["single_user", "multi_turn", "unicode"]),
    ("features", FEATURES_TEMPLATE, "<s>", "</s>", ["multi_turn", "with_system", "with_thinking"]),
]

# Renders with extra template variables (transformers passes apply_chat_template's kwargs on).
TEMPLATE_EXTRA_RUNS = [
    ("qwen3", "single_user", True, {"enable_thinking": False}),
    ("qwen3", "with_thinking", True, {"enable_thinking": False}),
    ("qwen3", "with_thinking", True, {"enable_thinking": True}),
]

# Conversations a template rejects through raise_exception; the message must come through.
TEMPLATE_ERRORS = [
    ("mistral", "user_then_system", "Only user and assistant roles are supported!"),
    ("mistral", "assistant_first", "Conversation roles must alternate user/assistant/user/assistant/..."),
]


def make_chat_templates() -> None:
    conversations = dict(CONVERSATIONS)
    conversations["assistant_first"] = [
        {"role": "assistant", "content": "I speak first."},
        {"role": "user", "content": "Why?"},
    ]
    conversations["user_then_system"] = [
        {"role": "user", "content": "Hello."},
        {"role": "system", "content": "Late system prompt."},
    ]
    tok = PreTrainedTokenizerFast(tokenizer_file=str(OUT / "byte_level" / "tokenizer.json"))
    templates = {}
    renders = []
    for name, template, bos, eos, convs in TEMPLATE_CASES:
        templates[name] = {"source": template, "bos_token": bos, "eos_token": eos}
        tok.bos_token = bos
        tok.eos_token = eos
        runs = [(conv, gen, {}) for conv in convs for gen in (False, True)]
        runs += [(conv, gen, extra) for t, conv, gen, extra in TEMPLATE_EXTRA_RUNS if t == name]
        for conv, add_generation_prompt, extra in runs:
            rendered = tok.apply_chat_template(
                conversations[conv],
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
            renders.append({
                "template": name,
                "conversation": conv,
                "add_generation_prompt": add_generation_prompt,
                "extra": extra,
                "expected": rendered,
            })
    errors = []
    for name, conv, message in TEMPLATE_ERRORS:
        _, template, bos, eos, _ = next(c for c in TEMPLATE_CASES if c[0] == name)
        tok.bos_token = bos
        tok.eos_token = eos
        try:
            tok.apply_chat_template(conversations[conv], chat_template=template, tokenize=False)
        except Exception as err:  # transformers raises jinja2's TemplateError
            assert message in str(err), err
            errors.append({"template": name, "conversation": conv, "message": message})
        else:
            raise AssertionError(f"{name} accepted {conv}")
    doc = {
        "templates": templates,
        "conversations": conversations,
        "renders": renders,
        "errors": errors,
    }
    (OUT / "chat_templates.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    cases: dict = {}
    make_byte_level(cases)
    make_sentencepiece(cases)
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    make_chat_templates()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(REPO)} ({total} bytes)")


if __name__ == "__main__":
    main()

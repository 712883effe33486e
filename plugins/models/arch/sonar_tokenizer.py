"""SONAR's text tokenizer: NLLB's SentencePiece model with fairseq2's control symbols, without fairseq2.

Follows fairseq2 0.4 ``data/text/tokenizers/nllb.py`` and ``native/.../sp_processor.cc``: ``__<lang>__`` for every
language of the card, then ``<MINED_DATA>``, ``<MMT_BT_DATA>``, ``<SMT_BT_DATA>``, appended as CONTROL pieces, and
``<pad>`` appended then moved to index 0 (so ``<unk>``, ``<s>``, ``</s>`` become 1, 2, 3 and the released
256,000-piece model gives the 256,206-row vocabulary). A source sentence is ``__<lang>__`` + pieces + ``</s>``
(``create_encoder(lang=..., mode="source")``), cut to the encoder's ``max_seq_len`` as
``TextToEmbeddingModelPipeline.predict`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lalm_probe.core.errors import UserError

# The ``langs`` of sonar/cards/text_sonar_basic_encoder.yaml, in card order (the order fixes each token's id).
NLLB_LANGS = tuple("""
ace_Arab ace_Latn acm_Arab acq_Arab aeb_Arab afr_Latn ajp_Arab aka_Latn amh_Ethi apc_Arab arb_Arab ars_Arab
ary_Arab arz_Arab asm_Beng ast_Latn awa_Deva ayr_Latn azb_Arab azj_Latn bak_Cyrl bam_Latn ban_Latn bel_Cyrl
bem_Latn ben_Beng bho_Deva bjn_Arab bjn_Latn bod_Tibt bos_Latn bug_Latn bul_Cyrl cat_Latn ceb_Latn ces_Latn
cjk_Latn ckb_Arab crh_Latn cym_Latn dan_Latn deu_Latn dik_Latn dyu_Latn dzo_Tibt ell_Grek eng_Latn epo_Latn
est_Latn eus_Latn ewe_Latn fao_Latn pes_Arab fij_Latn fin_Latn fon_Latn fra_Latn fur_Latn fuv_Latn gla_Latn
gle_Latn glg_Latn grn_Latn guj_Gujr hat_Latn hau_Latn heb_Hebr hin_Deva hne_Deva hrv_Latn hun_Latn hye_Armn
ibo_Latn ilo_Latn ind_Latn isl_Latn ita_Latn jav_Latn jpn_Jpan kab_Latn kac_Latn kam_Latn kan_Knda kas_Arab
kas_Deva kat_Geor knc_Arab knc_Latn kaz_Cyrl kbp_Latn kea_Latn khm_Khmr kik_Latn kin_Latn kir_Cyrl kmb_Latn
kon_Latn kor_Hang kmr_Latn lao_Laoo lvs_Latn lij_Latn lim_Latn lin_Latn lit_Latn lmo_Latn ltg_Latn ltz_Latn
lua_Latn lug_Latn luo_Latn lus_Latn mag_Deva mai_Deva mal_Mlym mar_Deva min_Latn mkd_Cyrl plt_Latn mlt_Latn
mni_Beng khk_Cyrl mos_Latn mri_Latn zsm_Latn mya_Mymr nld_Latn nno_Latn nob_Latn npi_Deva nso_Latn nus_Latn
nya_Latn oci_Latn gaz_Latn ory_Orya pag_Latn pan_Guru pap_Latn pol_Latn por_Latn prs_Arab pbt_Arab quy_Latn
ron_Latn run_Latn rus_Cyrl sag_Latn san_Deva sat_Beng scn_Latn shn_Mymr sin_Sinh slk_Latn slv_Latn smo_Latn
sna_Latn snd_Arab som_Latn sot_Latn spa_Latn als_Latn srd_Latn srp_Cyrl ssw_Latn sun_Latn swe_Latn swh_Latn
szl_Latn tam_Taml tat_Cyrl tel_Telu tgk_Cyrl tgl_Latn tha_Thai tir_Ethi taq_Latn taq_Tfng tpi_Latn tsn_Latn
tso_Latn tuk_Latn tum_Latn tur_Latn twi_Latn tzm_Tfng uig_Arab ukr_Cyrl umb_Latn urd_Arab uzn_Latn vec_Latn
vie_Latn war_Latn wol_Latn xho_Latn ydd_Hebr yor_Latn yue_Hant zho_Hans zho_Hant zul_Latn
""".split())
EXTRA_CONTROL = ("<MINED_DATA>", "<MMT_BT_DATA>", "<SMT_BT_DATA>")


def _with_control_symbols(serialized: bytes, langs: Sequence[str]) -> bytes:
    """``sp_model_proto_loader``: append control pieces, then ``<pad>`` moved to the front (``<pad>@0``)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(serialized)
    control = pb.ModelProto.SentencePiece.CONTROL
    pieces = [pb.ModelProto.SentencePiece(piece="<pad>", type=control)]
    pieces += [pb.ModelProto.SentencePiece.FromString(p.SerializeToString()) for p in proto.pieces]
    pieces += [pb.ModelProto.SentencePiece(piece=s, type=control)
               for s in [f"__{lang}__" for lang in langs] + list(EXTRA_CONTROL)]
    del proto.pieces[:]
    proto.pieces.extend(pieces)
    proto.trainer_spec.pad_piece = "<pad>"
    return proto.SerializeToString()


class NllbTokenizer:
    """Source-side NLLB encoding: ``[__lang__] + pieces + [</s>]``; ``pad`` 0, ``unk`` 1, ``bos`` 2, ``eos`` 3."""

    def __init__(self, spm_model: bytes, langs: Sequence[str] = NLLB_LANGS, default_lang: str = "eng_Latn") -> None:
        import sentencepiece as spm

        self.spm_model, self.langs, self.default_lang = spm_model, tuple(langs), default_lang
        self.sp = spm.SentencePieceProcessor(model_proto=_with_control_symbols(spm_model, self.langs))
        self.pad_id, self.unk_id = self.sp.piece_to_id("<pad>"), self.sp.piece_to_id("<unk>")
        self.bos_id, self.eos_id = self.sp.piece_to_id("<s>"), self.sp.piece_to_id("</s>")

    @classmethod
    def from_file(cls, path: str | Path, langs: Sequence[str] = NLLB_LANGS,
                  default_lang: str = "eng_Latn") -> "NllbTokenizer":
        return cls(Path(path).read_bytes(), langs, default_lang)

    def lang_id(self, lang: str | None) -> int:
        """Id of ``__<lang>__``; the language must be one of the card's."""
        lang = lang or self.default_lang
        if lang not in self.langs:
            raise UserError(f"SONAR has no text language '{lang}' (FLORES-200 codes such as eng_Latn, fra_Latn).")
        return self.sp.piece_to_id(f"__{lang}__")

    def encode(self, text: str, lang: str | None = None, max_len: int | None = None) -> list[int]:
        ids = [self.lang_id(lang)] + self.sp.encode(text, out_type=int) + [self.eos_id]
        return ids[:max_len] if max_len is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) > self.eos_id and not self.sp.is_control(int(i))])

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        return self.sp.id_to_piece(int(ids)) if isinstance(ids, int) else [self.sp.id_to_piece(int(i)) for i in ids]

    def __len__(self) -> int:
        return self.sp.get_piece_size()


def tiny_spm_model(words: Sequence[str] = ("hello", "world", "the", "cat", "sat", "on", "mat", "bonjour", "le",
                                           "chat", "monde", "hallo", "welt", "die", "katze")) -> bytes:
    """A hand-built unigram SentencePiece model (no training, so its pieces are fixed): ``<unk> <s> </s>``, the
    word-start marker, single characters, and whole words preceded by the marker with better scores."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    kinds = pb.ModelProto.SentencePiece
    for piece, kind in (("<unk>", kinds.UNKNOWN), ("<s>", kinds.CONTROL), ("</s>", kinds.CONTROL)):
        p = proto.pieces.add()
        p.piece, p.type, p.score = piece, kind, 0.0
    chars = ["\u2581"] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'-")
    for piece, score in [(c, -10.0) for c in chars] + [("\u2581" + w, -1.0) for w in words]:
        p = proto.pieces.add()
        p.piece, p.type, p.score = piece, kinds.NORMAL, score
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()

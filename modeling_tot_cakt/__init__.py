"""TOT-CAKT: temporal-order-preserving optimal-transport knowledge transfer for CTC speech recognition."""

from transformers import AutoConfig, AutoModel, AutoModelForCTC

from .configuration_tot_cakt import TOTCAKTConfig
from .modeling_tot_cakt import (
    TOTCAKTForCTC,
    TOTCAKTModel,
    TOTCAKTModelOutput,
    TOTCAKTOutput,
    TOTCAKTPreTrainedModel,
    load_teacher,
)
from .processing_tot_cakt import create_processor, create_tokenizer
from .tot import tot_sinkhorn

# Local use: the Auto classes know the model without trust_remote_code.
AutoConfig.register(TOTCAKTConfig.model_type, TOTCAKTConfig)
AutoModel.register(TOTCAKTConfig, TOTCAKTModel)
AutoModelForCTC.register(TOTCAKTConfig, TOTCAKTForCTC)
# Saved folders carry `auto_map` and the code files, for processes where this package is absent.
TOTCAKTConfig.register_for_auto_class()
TOTCAKTModel.register_for_auto_class("AutoModel")
TOTCAKTForCTC.register_for_auto_class("AutoModelForCTC")

__version__ = "0.1.0"

__all__ = [
    "TOTCAKTConfig",
    "TOTCAKTForCTC",
    "TOTCAKTModel",
    "TOTCAKTModelOutput",
    "TOTCAKTOutput",
    "TOTCAKTPreTrainedModel",
    "create_processor",
    "create_tokenizer",
    "load_teacher",
    "tot_sinkhorn",
]

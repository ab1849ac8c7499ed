"""TOT-CAKT: temporal-order-preserving optimal-transport knowledge transfer for CTC speech recognition."""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForCTC, AutoProcessor

from .configuration_tot_cakt import TOTCAKTConfig
from .feature_extraction_tot_cakt import TOTCAKTFeatureExtractor, TOTCAKTLogMelFeatureExtractor
from .modeling_tot_cakt import (
    TOTCAKTForCTC,
    TOTCAKTModel,
    TOTCAKTModelOutput,
    TOTCAKTOutput,
    TOTCAKTPreTrainedModel,
    load_teacher,
)
from .processing_tot_cakt import create_processor, create_tokenizer
from .processing_tot_cakt_lm import TOTCAKTProcessorWithLM
from .tot import tot_sinkhorn

# Local use: the Auto classes know the model without trust_remote_code.
AutoConfig.register(TOTCAKTConfig.model_type, TOTCAKTConfig)
AutoModel.register(TOTCAKTConfig, TOTCAKTModel)
AutoModelForCTC.register(TOTCAKTConfig, TOTCAKTForCTC)
# AutoFeatureExtractor (and so AutoProcessor and the pipeline) finds a custom feature extractor by the class
# name saved in processor_config.json among the registered ones; the key, normally a config class, is not used
# for that, and a model configuration cannot name two. Each class is its own key, so that a TOTCAKTConfig alone
# never stands for one of them.
for feature_extractor_class in (TOTCAKTFeatureExtractor, TOTCAKTLogMelFeatureExtractor):
    AutoFeatureExtractor.register(feature_extractor_class, feature_extractor_class)
AutoProcessor.register(TOTCAKTProcessorWithLM, TOTCAKTProcessorWithLM)  # found by the name in processor_config.json
# Saved folders carry `auto_map` and the code files, for processes where this package is absent.
TOTCAKTConfig.register_for_auto_class()
TOTCAKTModel.register_for_auto_class("AutoModel")
TOTCAKTForCTC.register_for_auto_class("AutoModelForCTC")
TOTCAKTFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
TOTCAKTLogMelFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
TOTCAKTProcessorWithLM.register_for_auto_class("AutoProcessor")

__version__ = "0.1.0"

__all__ = [
    "TOTCAKTConfig",
    "TOTCAKTFeatureExtractor",
    "TOTCAKTForCTC",
    "TOTCAKTLogMelFeatureExtractor",
    "TOTCAKTModel",
    "TOTCAKTModelOutput",
    "TOTCAKTOutput",
    "TOTCAKTPreTrainedModel",
    "TOTCAKTProcessorWithLM",
    "create_processor",
    "create_tokenizer",
    "load_teacher",
    "tot_sinkhorn",
]

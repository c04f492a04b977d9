"""vlforge's models: shared layers/, image towers/, fusion/ and one folder per family (clip/, albef/,
blip/, blip2/, llava/). Loading one by name, with weights, is vlforge.hub (`from vlforge import
load_model`)."""

"""The vision-language kit: `digit-scenes` data, TinyCLIP and its pretraining, retrieval and grounding metrics.

- `scenes`: 32×32 scenes of 1–3 coloured digits with exact attributes; `captions`: template captions
  with synonyms, their parser and yes/no questions; `derived`: noisy pairs, composed-retrieval
  triplets and galleries, text triplets; `videos`: frame sequences with an event in a known span.
- `tinyclip`: a `transformers.CLIPModel` under a million parameters and its caption tokenizer;
  `towers`: our loop over the encoder layers with prompt, skip and adapter hooks; `losses`: the
  CLIP loss; `zero_shot`: features and zero-shot classifiers.
- `pretraining` trains TinyCLIP on the seen classes; `base` caches and registers it, trained once.
- `evaluation`: R@K and rSum, ranking mAP, zero-shot accuracy, moment-retrieval mAP and R1@IoU, HIT@1.
"""

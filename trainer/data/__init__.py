"""Training data: sources of documents (:mod:`.corpus`), the weighted, length-scheduled step loader
(:mod:`.mixture`), what a checkpoint records of the data (:mod:`.fingerprint`), and ``sp-data prepare``
(:mod:`.prepare`: tokenised corpora in megatron-core's indexed format)."""

"""`dinokit curate`: DINOv2's data curation (dedup, decontamination, retrieval from seeds) and the hierarchical
k-means + balanced sampling of Vo et al. 2024 (DINOv3's LVD-1689M), over embedding folders.

One module per stage, read top to bottom by `pipeline.curate`:
    inputs      embedding folders / .npy files -> unit float32 vectors with names, checked for mixes
    knn         k-NN graphs (faiss exact, IVF when large), union-find components, NN-similarity histograms
    dedup       self-dedup (one kept per component) and decontamination (--exclude)
    kmeans      k-means++ (sklearn's greedy variant), Lloyd steps with float64 centroid sums
    hierarchy   hierarchical k-means with resampling, the default level sizes, the first-level split
    sampling    the water-filling allocation and the top-down balanced sampling
    retrieval   sample- and cluster-based retrieval from curated seed sets
    report      report.html and its pictures
    pipeline    the stages, resumable, each writing its result atomically; manifest and selection tables
"""

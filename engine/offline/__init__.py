"""Offline work, never imported by the serving path: data sets, the SVD and iALS trainers, evaluation, reranker
training and seeding an engine from a data set. The CLI commands and the server (only to seed an empty data dir)
import it lazily."""

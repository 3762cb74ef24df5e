"""The JSON the service answers with, as pydantic models: FastAPI's OpenAPI schema documents them.

The fields are those of :mod:`dn2.review.results`' records, which the page and the report draw.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["Health", "ImageResult", "ModelInfo", "Models", "Neighbour", "Problem", "ScoreResponse"]


class Neighbour(BaseModel):
    """A normal training image close to the query: part of the reason for its score."""

    name: str = Field(description="the training image's name, as recorded when the model was fitted",
                      examples=["good/0042.png"])
    distance: float = Field(description="Euclidean distance between the embeddings", examples=[7.31])
    thumbnail: str | None = Field(
        description="URL of its thumbnail (GET, same token), or null when the model was fitted without --thumbnails",
        examples=["/v1/thumbnails/parts/17"])


class ImageResult(BaseModel):
    """The verdict on one uploaded image, or why it could not be scored."""

    name: str = Field(description="the uploaded file's name (a label only), or files[i]", examples=["part-0193.jpg"])
    anomaly_score: float | None = Field(
        description="mean distance to the k nearest normal training images (the DN2 paper's d(y)); higher = more anomalous",
        examples=[12.84])
    verdict: Literal["normal", "anomaly"] | None = Field(description="anomaly when the score is above the threshold",
                                                         examples=["anomaly"])
    threshold: float | None = Field(description="the model's threshold", examples=[9.7])
    nearest: list[Neighbour] = Field(description="the nearest normal training images, nearest first (explain=N)")
    heatmap: str | None = Field(
        default=None, description="where the model has anomaly maps: the heat map over the image, a PNG data URL")
    error: str | None = Field(default=None, description="why this image was not scored (the others still are)",
                              examples=[None])


class ScoreResponse(BaseModel):
    model: str = Field(description="the model that scored the images", examples=["parts"])
    results: list[ImageResult] = Field(description="one result per uploaded file, in upload order")

    model_config = {"json_schema_extra": {"examples": [{
        "model": "parts",
        "results": [
            {"name": "part-0193.jpg", "anomaly_score": 12.84, "verdict": "anomaly", "threshold": 9.7,
             "nearest": [{"name": "good/0042.png", "distance": 12.1, "thumbnail": "/v1/thumbnails/parts/17"}],
             "heatmap": None, "error": None},
            {"name": "notes.txt", "anomaly_score": None, "verdict": None, "threshold": None, "nearest": [],
             "heatmap": None, "error": "notes.txt: not an image, or an unsupported image format"},
        ]}]}}


class ModelInfo(BaseModel):
    """What a loaded model is: enough to tell models apart and to interpret their scores."""

    name: str = Field(examples=["parts"])
    backbone: str = Field(examples=["efficientnet_lite0+efficientnet_lite2"])
    preset: str = Field(examples=["best"])
    normalize: str = Field(examples=["sqrt_l2"])
    k: int = Field(description="neighbours averaged in the score", examples=[2])
    threshold: float = Field(description="scores above it are anomalies", examples=[0.41])
    training_size: int = Field(description="training images the model was fitted on", examples=[1200])
    memory_size: int = Field(description="embeddings searched (kept training images or k-means centres)", examples=[1200])
    precision: str = Field(examples=["bf16"])
    dn2_version: str = Field(description="the dn2 that wrote the model file", examples=["0.1.0"])
    thumbnails: bool = Field(description="whether nearest normals come with thumbnails")
    maps: bool = Field(description="whether results carry heat maps")


class Models(BaseModel):
    dn2_version: str = Field(description="the dn2 serving them", examples=["0.1.0"])
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Problem(BaseModel):
    """Why a request was refused."""

    detail: str = Field(examples=["more than 64 images in one request (--max-images)"])

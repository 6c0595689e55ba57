"""The HTTP API's request and response models: the one module the server and the workers share.

The server validates a request with these models before it enqueues anything; the worker parses
the same model again from the job's arguments, so a job never sees a shape the API did not accept.
The engine's own pydantic models are reused where they exist (`CaptureOptions`, `TextsSource`,
`HFSource`, `TrainConfig`) so a field is defined once for the CLI, the API and the stored config.

What a client may name is deliberately narrower than what the engine accepts: never a filesystem
path. Datasets are inline texts, an upload id (the worker turns it into a file under the store)
or a Hugging Face hub id; models are bundled names, hub ids or names of server-configured local
directories.
"""

from __future__ import annotations

from kestrel.core.hub import HUB_ID as HUB_ID
from kestrel.schemas.analyses import _ANALYSIS_REQUEST as _ANALYSIS_REQUEST
from kestrel.schemas.analyses import AnalysisDetail as AnalysisDetail
from kestrel.schemas.analyses import AnalysisManifest as AnalysisManifest
from kestrel.schemas.analyses import AnalysisPage as AnalysisPage
from kestrel.schemas.analyses import AnalysisRequest as AnalysisRequest
from kestrel.schemas.analyses import AnalysisSummary as AnalysisSummary
from kestrel.schemas.analyses import CausalAnalysisRequest as CausalAnalysisRequest
from kestrel.schemas.analyses import EditedFeature as EditedFeature
from kestrel.schemas.analyses import GraphInterventionRequest as GraphInterventionRequest
from kestrel.schemas.analyses import GraphInterventionResponse as GraphInterventionResponse
from kestrel.schemas.analyses import InterventionTarget as InterventionTarget
from kestrel.schemas.analyses import NodeEdit as NodeEdit
from kestrel.schemas.analyses import TokenLogit as TokenLogit
from kestrel.schemas.analyses import parse_analysis_request as parse_analysis_request
from kestrel.schemas.common import PACKAGED_BUILDERS as PACKAGED_BUILDERS
from kestrel.schemas.common import TERMINAL_STATES as TERMINAL_STATES
from kestrel.schemas.common import ErrorBody as ErrorBody
from kestrel.schemas.common import ErrorResponse as ErrorResponse
from kestrel.schemas.common import HealthStatus as HealthStatus
from kestrel.schemas.common import JobInfo as JobInfo
from kestrel.schemas.common import JobPage as JobPage
from kestrel.schemas.common import JobState as JobState
from kestrel.schemas.common import Page as Page
from kestrel.schemas.common import ReadyStatus as ReadyStatus
from kestrel.schemas.common import T as T
from kestrel.schemas.features import ConceptImportResult as ConceptImportResult
from kestrel.schemas.features import ConceptInput as ConceptInput
from kestrel.schemas.features import ConceptPage as ConceptPage
from kestrel.schemas.features import DiscoverRequest as DiscoverRequest
from kestrel.schemas.features import FeatureBin as FeatureBin
from kestrel.schemas.features import FeatureConcept as FeatureConcept
from kestrel.schemas.features import FeatureContext as FeatureContext
from kestrel.schemas.features import FeatureDetail as FeatureDetail
from kestrel.schemas.features import FeatureHistogram as FeatureHistogram
from kestrel.schemas.features import FeaturePage as FeaturePage
from kestrel.schemas.features import FeatureSummary as FeatureSummary
from kestrel.schemas.features import GeneratedText as GeneratedText
from kestrel.schemas.features import GeneratedToken as GeneratedToken
from kestrel.schemas.features import GenerateRequest as GenerateRequest
from kestrel.schemas.features import GenerateResponse as GenerateResponse
from kestrel.schemas.features import GenerationPair as GenerationPair
from kestrel.schemas.features import LabelRequest as LabelRequest
from kestrel.schemas.features import LogitEffect as LogitEffect
from kestrel.schemas.features import LogitEffects as LogitEffects
from kestrel.schemas.features import SteeringDirection as SteeringDirection
from kestrel.schemas.features import SteeringPage as SteeringPage
from kestrel.schemas.features import SteeringPreview as SteeringPreview
from kestrel.schemas.features import SteeringPreviewRequest as SteeringPreviewRequest
from kestrel.schemas.features import SteeringRecord as SteeringRecord
from kestrel.schemas.features import SteeringTouch as SteeringTouch
from kestrel.schemas.features import TokenCount as TokenCount
from kestrel.schemas.models import EmbeddedModelInfo as EmbeddedModelInfo
from kestrel.schemas.models import EmbeddedModelPage as EmbeddedModelPage
from kestrel.schemas.models import LayerRow as LayerRow
from kestrel.schemas.models import LayerTable as LayerTable
from kestrel.schemas.models import ModelInfo as ModelInfo
from kestrel.schemas.models import ModelLoadedBy as ModelLoadedBy
from kestrel.schemas.models import ModelLoadRequest as ModelLoadRequest
from kestrel.schemas.models import ModelLoadResult as ModelLoadResult
from kestrel.schemas.models import ModelPage as ModelPage
from kestrel.schemas.models import ModelUnloadResult as ModelUnloadResult
from kestrel.schemas.runs import CaptureDataset as CaptureDataset
from kestrel.schemas.runs import CaptureRequest as CaptureRequest
from kestrel.schemas.runs import HubDatasetSource as HubDatasetSource
from kestrel.schemas.runs import RowField as RowField
from kestrel.schemas.runs import RunImportRequest as RunImportRequest
from kestrel.schemas.runs import RunManifest as RunManifest
from kestrel.schemas.runs import RunPage as RunPage
from kestrel.schemas.runs import RunSummary as RunSummary
from kestrel.schemas.runs import UploadFormat as UploadFormat
from kestrel.schemas.runs import UploadInfo as UploadInfo
from kestrel.schemas.runs import UploadKind as UploadKind
from kestrel.schemas.runs import UploadPage as UploadPage
from kestrel.schemas.runs import UploadSource as UploadSource
from kestrel.schemas.saes import DeletedResponse as DeletedResponse
from kestrel.schemas.saes import EncodeRequest as EncodeRequest
from kestrel.schemas.saes import EncodeResponse as EncodeResponse
from kestrel.schemas.saes import EvaluateRequest as EvaluateRequest
from kestrel.schemas.saes import LatentValue as LatentValue
from kestrel.schemas.saes import SAEFormat as SAEFormat
from kestrel.schemas.saes import SAEHistory as SAEHistory
from kestrel.schemas.saes import SAEHyperparameters as SAEHyperparameters
from kestrel.schemas.saes import SAEImportFormat as SAEImportFormat
from kestrel.schemas.saes import SAEManifest as SAEManifest
from kestrel.schemas.saes import SAEPage as SAEPage
from kestrel.schemas.saes import SAESummary as SAESummary
from kestrel.schemas.saes import StreamSAERequest as StreamSAERequest
from kestrel.schemas.saes import StreamToken as StreamToken
from kestrel.schemas.saes import TokenLatents as TokenLatents
from kestrel.schemas.saes import TrainingPoint as TrainingPoint
from kestrel.schemas.saes import TrainRequest as TrainRequest
from kestrel.schemas.saes import _fields_of as _fields_of
from kestrel.schemas.steering import ContinuationEffect as ContinuationEffect
from kestrel.schemas.steering import LogitAgreement as LogitAgreement
from kestrel.schemas.steering import LogitCheckRequest as LogitCheckRequest
from kestrel.schemas.steering import LogitCheckResponse as LogitCheckResponse
from kestrel.schemas.steering import ResolvedEdit as ResolvedEdit
from kestrel.schemas.steering import SteeringEffect as SteeringEffect
from kestrel.schemas.steering import SteeringSweepRequest as SteeringSweepRequest
from kestrel.schemas.steering import SteeringSweepResponse as SteeringSweepResponse
from kestrel.schemas.steering import SweepBaseline as SweepBaseline
from kestrel.schemas.steering import SweepPoint as SweepPoint
from kestrel.schemas.steering import SweepText as SweepText
from kestrel.schemas.steering import TokenEffects as TokenEffects
from kestrel.schemas.steering import TokenValue as TokenValue

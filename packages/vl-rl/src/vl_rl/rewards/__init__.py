"""Verifiable rewards for VLM RL: extraction, verifiers, penalties, judge, composition (REFERENCE.md section 5)."""

from vl_rl.rewards._reasons import collect_reasons
from vl_rl.rewards._timeout import RewardTimeoutError, call_with_timeout
from vl_rl.rewards._worker import RewardWorkerError
from vl_rl.rewards.compose import (
    CombinedReward,
    Isolation,
    RewardFunction,
    SafeReward,
    TaskRouter,
    combine,
    route_by_task,
    safe_reward,
    score_batch,
)
from vl_rl.rewards.extract import answer_region, answer_text, extract_answer, find_boxed, last_number
from vl_rl.rewards.grounding import box_iou, grounding_reward, grounding_score, parse_boxes
from vl_rl.rewards.judge import DEFAULT_JUDGE_TEMPLATE, JudgeReward, LRUCache, parse_judge_score
from vl_rl.rewards.math_verify import math_equal, math_reward, parse_number
from vl_rl.rewards.penalties import (
    code_switching_penalty,
    code_switching_reward,
    dominant_script,
    format_reward,
    repetition_penalty,
    repetition_reward,
    script_of,
    soft_overlong_penalty,
    think_format_ok,
)
from vl_rl.rewards.tool import count_tool_calls, tool_call_reward, tool_reward
from vl_rl.rewards.verifiers import (
    chart_reward,
    choice_reward,
    count_reward,
    edit_distance,
    extract_choice,
    ocr_reward,
    ocr_similarity,
    parse_count,
    parse_timestamp,
    timestamp_reward,
)

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "CombinedReward",
    "Isolation",
    "JudgeReward",
    "LRUCache",
    "RewardFunction",
    "RewardTimeoutError",
    "RewardWorkerError",
    "SafeReward",
    "TaskRouter",
    "answer_region",
    "answer_text",
    "box_iou",
    "call_with_timeout",
    "chart_reward",
    "choice_reward",
    "code_switching_penalty",
    "code_switching_reward",
    "collect_reasons",
    "combine",
    "count_reward",
    "count_tool_calls",
    "dominant_script",
    "edit_distance",
    "extract_answer",
    "extract_choice",
    "find_boxed",
    "format_reward",
    "grounding_reward",
    "grounding_score",
    "last_number",
    "math_equal",
    "math_reward",
    "ocr_reward",
    "ocr_similarity",
    "parse_boxes",
    "parse_count",
    "parse_judge_score",
    "parse_number",
    "parse_timestamp",
    "repetition_penalty",
    "repetition_reward",
    "route_by_task",
    "safe_reward",
    "score_batch",
    "script_of",
    "soft_overlong_penalty",
    "think_format_ok",
    "timestamp_reward",
    "tool_call_reward",
    "tool_reward",
]

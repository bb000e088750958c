#include "block_manager.h"

#include <algorithm>
#include <string>
#include <unordered_set>

#include "common.h"

namespace grpo_fast {

uint64_t block_hash(uint64_t parent, const int64_t* tokens, int n) {
  uint64_t h = mix64(parent ^ 0x5BD1E995ull);
  for (int i = 0; i < n; ++i) h = mix64(h ^ static_cast<uint64_t>(tokens[i]));
  return h;
}

BlockManager::BlockManager(int64_t num_blocks, int block_size, bool enable_prefix_cache)
    : block_size_(block_size), prefix_(enable_prefix_cache) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX)
    throw std::invalid_argument("num_blocks must be a positive int32, got " +
                                std::to_string(num_blocks));
  if (block_size <= 0) throw std::invalid_argument("block_size must be a positive int");
  if (num_blocks * block_size > INT32_MAX)  // slots are int32 in the kernels
    throw std::invalid_argument("num_blocks * block_size must fit in int32");
  ref_.assign(num_blocks, 0);
  free_.resize(num_blocks);
  for (int64_t i = 0; i < num_blocks; ++i) free_[i] = static_cast<int32_t>(num_blocks - 1 - i);
  lru_pos_.resize(num_blocks);
  has_hash_.assign(num_blocks, false);
  hash_of_.assign(num_blocks, 0);
  tokens_of_.resize(num_blocks);
}

const BlockManager::Seq& BlockManager::seq(int64_t id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end())
    throw std::invalid_argument("seq_id " + std::to_string(id) + " is not allocated");
  return it->second;
}
BlockManager::Seq& BlockManager::seq(int64_t id) {
  return const_cast<Seq&>(static_cast<const BlockManager*>(this)->seq(id));
}

int32_t BlockManager::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks()) throw std::invalid_argument("block out of range");
  return ref_[block];
}

int32_t BlockManager::take_free() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else {  // evict the least recently used cached block
    b = cached_free_.front();
    cached_free_.pop_front();
    uncache(b);
  }
  ref_[b] = 1;
  return b;
}

void BlockManager::uncache(int32_t b) {
  if (!has_hash_[b]) return;
  auto it = hash_to_block_.find(hash_of_[b]);
  if (it != hash_to_block_.end() && it->second == b) hash_to_block_.erase(it);
  has_hash_[b] = false;
  tokens_of_[b].clear();
}

void BlockManager::release(int32_t b) {
  if (--ref_[b] == 0) {
    if (has_hash_[b]) {  // keep its content reachable until the block is needed again
      lru_pos_[b] = cached_free_.insert(cached_free_.end(), b);
    } else {
      free_.push_back(b);
    }
  }
}

int32_t BlockManager::lookup(uint64_t h, const int64_t* tokens) const {
  auto it = hash_to_block_.find(h);
  if (it == hash_to_block_.end()) return -1;
  const auto& have = tokens_of_[it->second];
  if (!std::equal(have.begin(), have.end(), tokens)) return -1;  // collision: a miss
  return it->second;
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  return (num_tokens + block_size_ - 1) / block_size_ <= num_free_blocks();
}

int BlockManager::append_needs_block(const Seq& s) const {
  if (s.num_tokens % block_size_ == 0) return 1;
  return ref_[s.blocks.back()] > 1 ? 1 : 0;
}

bool BlockManager::can_append(int64_t seq_id) const {
  return append_needs_block(seq(seq_id)) <= num_free_blocks();
}

int64_t BlockManager::allocate(int64_t seq_id, const std::vector<int64_t>& tokens) {
  if (seqs_.count(seq_id))
    throw std::invalid_argument("seq_id " + std::to_string(seq_id) + " is already allocated");
  if (tokens.empty()) throw std::invalid_argument("token_ids must not be empty");
  const int64_t bs = block_size_, n = static_cast<int64_t>(tokens.size());
  const int64_t n_blocks = (n + bs - 1) / bs, n_full = n / bs;
  // Hits: leading full blocks that end before the last token (the last token is recomputed).
  std::vector<uint64_t> hashes(n_full);
  std::vector<int32_t> hits;
  uint64_t h = kRootHash;
  for (int64_t i = 0; i < n_full; ++i) {
    h = block_hash(h, tokens.data() + i * bs, block_size_);
    hashes[i] = h;
    if (prefix_ && (i + 1) * bs < n && static_cast<int64_t>(hits.size()) == i) {
      const int32_t b = lookup(h, tokens.data() + i * bs);
      if (b >= 0) hits.push_back(b);
    }
  }
  int64_t cost = n_blocks - static_cast<int64_t>(hits.size());
  for (int32_t b : hits) cost += ref_[b] == 0;
  if (cost > num_free_blocks())
    throw OutOfBlocks("allocate(" + std::to_string(seq_id) + "): needs " + std::to_string(cost) +
                      " free blocks, " + std::to_string(num_free_blocks()) + " free");
  if (prefix_) {
    cache_queries_ += std::min(n_full, (n - 1) / bs);
    cache_hits_ += static_cast<int64_t>(hits.size());
  }
  Seq s;
  s.blocks.reserve(n_blocks);
  for (int32_t b : hits) {
    if (ref_[b] == 0) {
      cached_free_.erase(lru_pos_[b]);
      }
    ++ref_[b];
    s.blocks.push_back(b);
  }
  for (int64_t i = static_cast<int64_t>(hits.size()); i < n_blocks; ++i) {
    const int32_t b = take_free();
    s.blocks.push_back(b);
    if (prefix_ && i < n_full && !hash_to_block_.count(hashes[i])) {
      hash_to_block_[hashes[i]] = b;
      has_hash_[b] = true;
      hash_of_[b] = hashes[i];
      tokens_of_[b].assign(tokens.begin() + i * bs, tokens.begin() + (i + 1) * bs);
    }
  }
  s.num_tokens = n;
  seqs_.emplace(seq_id, std::move(s));
  return static_cast<int64_t>(hits.size()) * bs;
}

void BlockManager::fork(int64_t parent_id, const std::vector<int64_t>& child_ids) {
  const Seq& p = seq(parent_id);
  std::unordered_set<int64_t> seen;
  for (int64_t c : child_ids) {
    if (!seen.insert(c).second)
      throw std::invalid_argument("child_ids has a duplicate: " + std::to_string(c));
    if (seqs_.count(c))
      throw std::invalid_argument("child id " + std::to_string(c) + " is already allocated");
  }
  Seq copy = p;  // p may be invalidated by rehashing below
  for (int64_t c : child_ids) {
    for (int32_t b : copy.blocks) ++ref_[b];
    seqs_.emplace(c, copy);
  }
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::append_token(int64_t seq_id) {
  Seq& s = seq(seq_id);
  if (append_needs_block(s) > num_free_blocks())
    throw OutOfBlocks("append_token(" + std::to_string(seq_id) + "): no free block");
  std::vector<std::pair<int32_t, int32_t>> copies;
  if (s.num_tokens % block_size_ == 0) {
    s.blocks.push_back(take_free());
  } else if (ref_[s.blocks.back()] > 1) {  // shared partial block: copy before the first write
    const int32_t src = s.blocks.back();
    const int32_t dst = take_free();
    --ref_[src];  // others still hold it
    s.blocks.back() = dst;
    copies.emplace_back(src, dst);
  }
  ++s.num_tokens;
  return copies;
}

void BlockManager::free(int64_t seq_id) {
  Seq& s = seq(seq_id);
  for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) release(*it);
  seqs_.erase(seq_id);
}

void BlockManager::reset_prefix_cache() {
  for (int32_t b : cached_free_) {
    uncache(b);
    free_.push_back(b);
  }
  cached_free_.clear();
  for (int64_t b = 0; b < num_blocks(); ++b) uncache(static_cast<int32_t>(b));
}

void BlockManager::slot_mapping(int64_t seq_id, int64_t start, int64_t end, int32_t* out) const {
  const Seq& s = seq(seq_id);
  for (int64_t i = start; i < end; ++i)
    out[i - start] = static_cast<int32_t>(token_slot(s.blocks.data(), i, block_size_));
}

int64_t BlockManager::max_table_len(const std::vector<int64_t>& seq_ids) const {
  int64_t w = 0;
  for (int64_t id : seq_ids) w = std::max<int64_t>(w, seq(id).blocks.size());
  return w;
}

void BlockManager::decode_metadata(const std::vector<int64_t>& seq_ids, int64_t width,
                                   int32_t* slots, int32_t* tables, int32_t* lens) const {
  for (size_t r = 0; r < seq_ids.size(); ++r) {
    const Seq& s = seq(seq_ids[r]);
    slots[r] = static_cast<int32_t>(token_slot(s.blocks.data(), s.num_tokens - 1, block_size_));
    int32_t* row = tables + r * width;
    std::copy(s.blocks.begin(), s.blocks.end(), row);
    std::fill(row + s.blocks.size(), row + width, -1);
    lens[r] = static_cast<int32_t>(s.num_tokens);
  }
}

int64_t BlockManager::blocks_logical() const {
  int64_t n = 0;
  for (const auto& kv : seqs_) n += static_cast<int64_t>(kv.second.blocks.size());
  return n;
}

}  // namespace grpo_fast

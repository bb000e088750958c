// Paged KV-cache block manager: ref-counted fixed-size blocks, per-sequence block tables, fork
// with copy-on-write of a shared partial block, and a content-hash prefix cache over full blocks.
// Same contract as the Python twin grpo_fast/kv/py_block_manager.py (the property tests run
// both on the same operation sequences and compare them).
#pragma once

#include <cstdint>
#include <list>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace grpo_fast {

// Thrown when the pool has no free block; Python sees grpo_fast.kv.OutOfBlocksError.
struct OutOfBlocks : std::runtime_error {
  using std::runtime_error::runtime_error;
};

uint64_t block_hash(uint64_t parent, const int64_t* tokens, int n);
constexpr uint64_t kRootHash = 0x243F6A8885A308D3ull;

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int block_size, bool enable_prefix_cache);

  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  int64_t num_free_blocks() const {
    return static_cast<int64_t>(free_.size() + cached_free_.size());
  }

  bool can_allocate(int64_t num_tokens) const;
  bool can_append(int64_t seq_id) const;
  // Returns the number of leading prompt tokens whose KV is already cached (multiple of bs).
  int64_t allocate(int64_t seq_id, const std::vector<int64_t>& tokens);
  void fork(int64_t parent_id, const std::vector<int64_t>& child_ids);
  // Reserves the slot of one new token; returns copy-on-write (src, dst) pairs.
  std::vector<std::pair<int32_t, int32_t>> append_token(int64_t seq_id);
  void free(int64_t seq_id);
  void reset_prefix_cache();

  bool has_seq(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  const std::vector<int32_t>& block_table(int64_t seq_id) const { return seq(seq_id).blocks; }
  int64_t num_tokens(int64_t seq_id) const { return seq(seq_id).num_tokens; }
  int32_t ref_count(int64_t block) const;
  // slots of tokens [start, end) written to out (int32)
  void slot_mapping(int64_t seq_id, int64_t start, int64_t end, int32_t* out) const;
  int64_t max_table_len(const std::vector<int64_t>& seq_ids) const;
  void decode_metadata(const std::vector<int64_t>& seq_ids, int64_t width, int32_t* slots,
                       int32_t* tables, int32_t* lens) const;

  int64_t blocks_logical() const;
  int64_t cache_hits() const { return cache_hits_; }
  int64_t cache_queries() const { return cache_queries_; }
  int64_t cached_free_blocks() const { return static_cast<int64_t>(cached_free_.size()); }

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
  };
  const Seq& seq(int64_t id) const;
  Seq& seq(int64_t id);
  int32_t take_free();
  void release(int32_t b);
  void uncache(int32_t b);
  int append_needs_block(const Seq& s) const;
  int32_t lookup(uint64_t h, const int64_t* tokens) const;

  int block_size_;
  bool prefix_;
  std::vector<int32_t> ref_;
  std::vector<int32_t> free_;  // LIFO stack of blocks with no cached content
  std::list<int32_t> cached_free_;  // LRU (front = oldest) of unreferenced cached blocks
  std::vector<std::list<int32_t>::iterator> lru_pos_;
  std::vector<bool> has_hash_;
  std::vector<uint64_t> hash_of_;
  std::vector<std::vector<int64_t>> tokens_of_;  // tokens of a cached block (collision check)
  std::unordered_map<uint64_t, int32_t> hash_to_block_;
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t cache_hits_ = 0;
  int64_t cache_queries_ = 0;
};

}  // namespace grpo_fast
